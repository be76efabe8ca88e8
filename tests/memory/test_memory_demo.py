"""The memory part of `make demo` runs end to end through the MCP client and says what it shows."""

from __future__ import annotations

import pytest
from mcp import Client

from hydrabrain.servers.memory import demo
from hydrabrain.servers.memory.server import build_server
from hydrabrain.shared.config import Settings

pytestmark = pytest.mark.anyio


async def test_the_memory_demo_shows_superseded_facts_and_a_conversation(settings: Settings) -> None:
    lines: list[str] = []
    async with Client(build_server(settings)) as client:
        await demo.run(client, lines.append)
    shown = "\n".join(lines)
    assert "GitHub Actions supersedes Jenkins" in shown
    assert "remember_turns -> 5 turns in one call, 2 relative dates resolved" in shown
    assert "When did Ben adopt his puppy?' -> Ben: Busy! We adopted a beagle puppy" in shown and "(dates: 1 May 2026)" in shown
    assert "What did Ana's puppy chew?' -> nothing" in shown
