"""Learning across findings: attempts and outcomes go to the memory server, and its lessons open the next task file."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from hydrabrain.servers.loop.core import Loop
from hydrabrain.servers.loop.memory_link import project_key
from hydrabrain.shared.serving import build

BOTH_BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a + b\n"


@pytest.fixture
def memory_on(settings):
    settings.loop.memory = "suite"  # the memory server, in process, over the SDK's in-memory transport
    return settings


def test_a_dead_end_met_on_one_finding_opens_the_task_file_of_the_next_of_its_kind(make_repo, kit, memory_on):
    repo = make_repo()
    kit.commit_file(repo, "calc.py", BOTH_BUGGY, "mul regressed too")
    loop = Loop(memory_on)
    found = {f.key: f for f in loop.discover(repo).findings if f.kind == "failing_test"}
    first, second = found["tests.test_calc::test_add"], found["tests.test_calc::test_mul"]

    worktree = Path(loop.handoff(first.finding_id).path)
    tests = worktree / "tests" / "test_calc.py"
    # The same dead end twice: making the failing test agree with the bug instead of fixing the code.
    tests.write_text(tests.read_text().replace("add(2, 3) == 5", "add(2, 3) == -1"))
    assert loop.verify(first.finding_id).verdict == "FAIL"
    tests.write_text(tests.read_text().replace("add(2, 3) == -1", "add(2, 3) != 5"))
    assert loop.verify(first.finding_id).verdict == "FAIL"

    task = Path(loop.handoff(second.finding_id).task_file).read_text()
    opening, rest = task.split("\n# ", 1)
    assert opening.startswith("## Lessons from earlier work on this repository")
    lessons = [line for line in opening.splitlines() if line.startswith("- ")]
    assert any(line.startswith("- Dead end (failed 2 times)") and "must not change: tests/test_calc.py" in line for line in lessons)
    assert rest.startswith("failing test tests.test_calc::test_mul")


@pytest.mark.anyio
async def test_each_attempt_is_an_attempt_and_an_outcome_episode_filed_under_the_repo(make_repo, kit, memory_on):
    repo = make_repo()
    loop = Loop(memory_on)
    finding = next(f for f in loop.discover(repo).findings if f.key == "tests.test_calc::test_add")
    worktree = Path(loop.handoff(finding.finding_id).path)
    (worktree / "calc.py").write_text(kit.fixed)
    assert loop.verify(finding.finding_id).verdict == "PASS"

    async with Client(build("memory", memory_on)) as memory:
        found = await memory.call_tool("recall", {"query": "fixed failing test test_add", "user": project_key(str(repo)),
                                                  "kinds": ["attempt", "outcome"]})
    texts = {item["kind"]: item["text"] for item in found.structured_content["items"]}
    assert "calc.py +1 -1" in texts["attempt"]
    assert "verification passed" in texts["outcome"]
