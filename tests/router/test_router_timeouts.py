"""router.call_timeout_s holds for the suite's servers mounted in process, not only for external ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from hydrabrain.shared.config import Settings
from hydrabrain.shared.serving import build

pytestmark = pytest.mark.anyio


async def test_a_mounted_suite_server_that_hangs_is_cut_off_at_the_call_timeout(settings: Settings, tmp_path: Path) -> None:
    repo = tmp_path / "slow-repo"
    repo.mkdir()
    (repo / "test_slow.py").write_text("import time\n\n\ndef test_slow():\n    time.sleep(8)\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "a slow suite"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True, capture_output=True)
    settings.router.mount = ["loop"]
    settings.router.call_timeout_s = 2
    settings.loop.memory = "off"
    settings.loop.test_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    async with Client(build("router", settings)) as client:
        result = await client.call_tool("loop_discover", {"repo": str(repo)})
    # Before, the in-process call ran to the end (8 s of tests) and came back as a success.
    assert result.is_error and "did not answer tools/call discover within 2 s" in result.content[0].text
