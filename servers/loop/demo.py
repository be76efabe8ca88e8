"""The loop at work in the suite's demo: a tiny repo with a red test goes discover → handoff → verify.

The demo plays the part of the client's agent: it makes the fix in the finding's worktree itself,
between a FAIL and a PASS from the verifier.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

IDENTITY = ["-c", "user.name=hydrabrain demo", "-c", "user.email=demo@hydrabrain.invalid"]
BUGGY = 'def slugify(title):\n    return title.lower().replace(" ", "_")\n'
FIXED = 'def slugify(title):\n    return "-".join(title.lower().split())\n'
TESTS = (
    "from text import slugify\n\n\n"
    "def test_spaces_become_hyphens():\n    assert slugify('Hello World') == 'hello-world'\n\n\n"
    "def test_lowercase():\n    assert slugify('ABC') == 'abc'\n"
)


def make_repo(folder: Path) -> Path:
    repo = folder / "demo-repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    (repo / "text.py").write_text(BUGGY)
    (repo / "tests" / "test_text.py").write_text(TESTS)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "slugify"]):
        subprocess.run(["git", *IDENTITY, *args], cwd=repo, check=True, capture_output=True)
    return repo


async def _call(client: Any, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text}")
    return result.structured_content


async def run(client: Any, say: Callable[[str], None]) -> None:
    # Under the current folder: over stdio that is where the loop server may run a repository's commands.
    scratch = Path.cwd() / ".hydrabrain"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loop-demo-", dir=scratch) as tmp:
        repo = make_repo(Path(tmp))
        say(f"loop: a repo with a failing test at {repo}")
        found = await _call(client, "discover", repo=str(repo))
        for finding in found["findings"]:
            say(f"loop: discover -> {finding['finding_id']} [{finding['kind']}] {finding['title']}")
        red = next(f for f in found["findings"] if f["kind"] == "failing_test")
        handoff = await _call(client, "handoff", finding_id=red["finding_id"])
        say(f"loop: handoff -> worktree {handoff['path']} on branch {handoff['branch']}")

        first = await _call(client, "verify", finding_id=red["finding_id"])
        say(f"loop: verify -> {first['verdict']}")
        for reason in first["reasons"]:
            say(f"        {reason}")

        Path(handoff["path"], "text.py").write_text(FIXED)
        say("loop: (the agent fixes text.py in the worktree)")
        second = await _call(client, "verify", finding_id=red["finding_id"])
        say(f"loop: verify -> {second['verdict']}; change committed as {second['result_commit'][:10]} on {second['branch']}")
        for reason in second["reasons"]:
            say(f"        {reason}")
        status = await _call(client, "status", repo=str(repo))
        say(f"loop: status -> {status['repos'][0]['counts']}")
