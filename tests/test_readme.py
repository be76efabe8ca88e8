"""The README matches the code: quick start, settings, and every server's tools."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hydrabrain.shared.config import Settings
from hydrabrain.shared.serving import SERVER_NAMES, build

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_quick_start_is_make_demo_then_make_test() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert quick.index("make demo") < quick.index("make test")


def test_the_settings_table_is_generated_from_the_settings_model() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check", str(ROOT / "README.md")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("name", SERVER_NAMES)
async def test_every_tool_of_every_server_is_documented(name: str, settings: Settings) -> None:
    server = build(name, settings)
    section = README.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
    for tool in await server.list_tools():
        assert f"`{tool.name}" in section, f"{name}.{tool.name} is not in the README's {name} section"


@pytest.mark.anyio
async def test_the_scope_table_names_every_tool_under_the_scope_it_declares(settings: Settings) -> None:
    table = README.split("<!-- scopes:begin -->", 1)[1].split("<!-- scopes:end -->", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2] for line in table.strip().splitlines()}
    settings.router.mount = []
    for name in SERVER_NAMES:
        server = build(name, settings)
        for tool in await server.list_tools():
            scope = server.hydrabrain_scopes.tools.get(tool.name)  # type: ignore[attr-defined]
            assert scope and f"{name} " in rows[scope] and f"`{tool.name}`" in rows[scope], f"{name}.{tool.name} ({scope}) is not in its scope's row"
