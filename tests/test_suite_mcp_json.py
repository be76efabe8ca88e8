"""mcp.json is a working client configuration: each server starts over stdio exactly as it says."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
SERVERS = json.loads((ROOT / "mcp.json").read_text())["mcpServers"]


def test_mcp_json_lists_every_server_of_the_suite() -> None:
    assert set(SERVERS) == {f"hydrabrain-{n}" for n in ("wiki", "memory", "crag", "router", "loop")}
    for spec in SERVERS.values():
        assert spec["command"] == "hydrabrain" and spec["args"][0] == "serve"


@pytest.mark.anyio
@pytest.mark.parametrize("entry", sorted(SERVERS))
async def test_each_server_answers_over_stdio_as_mcp_json_launches_it(entry: str, isolated_home: Path) -> None:
    spec = SERVERS[entry]
    command = shutil.which(spec["command"], path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert command, "the hydrabrain command is installed beside the interpreter"
    params = StdioServerParameters(command=command, args=spec["args"], env={**os.environ, **spec.get("env", {}), "HYDRABRAIN_HOME": str(isolated_home)})
    async with Client(params, read_timeout_seconds=120) as client:
        tools = await client.list_tools()
        assert tools.tools, f"{entry} exposes tools"
        assert all(t.description for t in tools.tools)
        assert client.server_info.name == entry
