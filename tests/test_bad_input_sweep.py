"""Every tool of every server, fed bad values for each argument, answers with a clear message:
a validation error or a tool error that says what is wrong, never the SDK's bare
"Error executing tool" (an exception the tool did not expect) and never a broken session."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from hydrabrain.shared.config import Settings
from hydrabrain.shared.serving import build

pytestmark = pytest.mark.anyio

BAD_STRINGS = {
    "empty": "",
    "blank": "   \n\t ",
    "nul": "a\x00b",
    "one long line": "word " * 4000,
    "odd url": "file:///etc/passwd",
    "control": "\x1b[31m\x07\x08",
}
WRONG_TYPES = {"number for text": 12345, "list for text": ["a"], "object for text": {"a": 1}}
# What an exception the tool did not expect looks like when it leaks: Python's own words, not ours.
RAW_ERRORS = ("Traceback", "[Errno", "embedded null byte", "object has no attribute", "NoneType", "KeyError", "unhashable type")
# Arguments that name a repository or write files run real work; the loop has its own tests for them.
SKIP = {("router", "complete")}  # needs a provider; its argument errors are tested with the router


def _calls(tool: Any) -> list[tuple[str, dict[str, Any]]]:
    """(label, arguments) pairs: each string argument in turn gets each bad value, the others a sane one."""
    props: dict[str, Any] = tool.input_schema.get("properties", {})
    required = set(tool.input_schema.get("required", []))
    sane = {name: "hello" for name, spec in props.items() if name in required and _is_text(spec)}
    calls = []
    for name, spec in props.items():
        if not _is_text(spec):
            continue
        for label, value in {**BAD_STRINGS, **WRONG_TYPES}.items():
            calls.append((f"{name}={label}", {**sane, name: value}))
    return calls


def _is_text(spec: dict[str, Any]) -> bool:
    if spec.get("type") == "string":
        return True
    return any(option.get("type") == "string" for option in spec.get("anyOf", []))


@pytest.mark.parametrize("name", ["wiki", "memory", "crag", "router", "loop"])
async def test_every_tool_answers_bad_values_with_a_clear_message(name: str, settings: Settings) -> None:
    settings.router.mount = []
    settings.memory.extract_facts = False
    settings.crag.web_search_url = None
    settings.loop.memory = "off"
    problems = []
    async with Client(build(name, settings), cache=None) as client:
        for tool in (await client.list_tools()).tools:
            if (name, tool.name) in SKIP:
                continue
            for label, arguments in _calls(tool):
                try:
                    result = await client.call_tool(tool.name, arguments)
                except MCPError as exc:  # a protocol-level refusal is clear if it says something
                    if not str(exc).strip():
                        problems.append(f"{tool.name}({label}): empty protocol error")
                    continue
                text = result.content[0].text if result.content else ""
                detail = text.removeprefix(f"Error executing tool {tool.name}").lstrip(": ")
                if result.is_error and (not detail.strip() or any(raw in detail for raw in RAW_ERRORS)):
                    problems.append(f"{tool.name}({label}): {text[:160]!r}")
                if not result.is_error:
                    json.dumps(result.structured_content)  # an answer is plain JSON
    assert not problems, "\n".join(problems)
