"""The router's own MCP tools over a real client session, against loopback providers."""

from __future__ import annotations

import json
import os
import sys

import pytest
from fake_providers import anthropic_fake, ok, openai_fake, provider, status, with_providers  # noqa: F401
from mcp import Client, StdioServerParameters

from hydrabrain.servers.cli import main as cli_main
from hydrabrain.servers.router.server import build_server
from hydrabrain.shared.config import BudgetConfig, ModelPrice, Settings

pytestmark = pytest.mark.anyio

FAST = ModelPrice(name="fast", input_per_mtok=0.2, output_per_mtok=0.8, context_window=16_000, tasks={"general": 1, "bulk": 2})
DEEP = ModelPrice(name="deep", input_per_mtok=5.0, output_per_mtok=25.0, context_window=200_000, tasks={"general": 3, "reasoning": 3})


def no_mounts(settings: Settings) -> Settings:
    return settings.model_copy(update={"router": settings.router.model_copy(update={"mount": []})})


@pytest.fixture
def plain(settings, monkeypatch) -> Settings:
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return no_mounts(settings)


async def test_in_plain_mode_complete_explains_how_to_configure_a_provider_and_the_rest_still_answers(plain):
    async with Client(build_server(plain)) as client:
        result = await client.call_tool("complete", {"prompt": "hello"})
        assert result.is_error and "OPENAI_BASE_URL" in result.content[0].text and "ANTHROPIC_API_KEY" in result.content[0].text
        decision = (await client.call_tool("route", {"task": "code", "prompt": "x"})).structured_content
        assert decision["chain"] == [] and "no LLM provider" in decision["explanation"]
        providers = (await client.call_tool("providers", {})).structured_content
        assert providers["configured"] is False
        assert (await client.call_tool("usage", {})).structured_content["calls"] == 0


async def test_complete_answers_through_the_chain_and_usage_attributes_the_spend(plain, openai_fake, anthropic_fake):
    openai_fake.script("deep", status(500), status(500), status(500))
    anthropic_fake.script("fast", ok("fallback answer", input_tokens=100, output_tokens=10))
    settings = with_providers(plain, provider(openai_fake, "primary", DEEP), provider(anthropic_fake, "backup", FAST), quality="best",
                              budgets=[BudgetConfig(tenant="acme", period="month", limit_usd=5.0)])
    async with Client(build_server(settings)) as client:
        result = await client.call_tool("complete", {"prompt": "why?", "task": "reasoning", "tenant": "acme", "feature": "demo"})
        answer = result.structured_content
        assert not result.is_error and answer["text"] == "fallback answer" and answer["provider"] == "backup"
        assert answer["fallbacks_tried"][0].startswith("primary/deep (HTTP 500")
        assert answer["cost_usd"] == pytest.approx((100 * 0.2 + 10 * 0.8) / 1e6)
        usage = (await client.call_tool("usage", {"tenant": "acme", "since": "24h"})).structured_content
        outcomes = {(r["model"], r["outcome"]): r["calls"] for r in usage["rows"]}
        assert outcomes == {("deep", "error"): 3, ("fast", "ok"): 1}
        assert usage["budgets"][0]["spent_usd"] == pytest.approx(answer["cost_usd"])
        health = {p["model"]: p for p in (await client.call_tool("providers", {})).structured_content["providers"]}
        assert health["deep"]["failures"] == 3 and health["deep"]["cooldown_s"] > 0 and health["fast"]["healthy"]
        bad_since = await client.call_tool("usage", {"since": "last tuesday"})
        assert bad_since.is_error and "'24h', '7d'" in bad_since.content[0].text


async def test_complete_returns_parsed_json_for_a_schema(plain, openai_fake):
    openai_fake.script("fast", ok('{"title": "Router", "tags": ["mcp"]}'))
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array"}}, "required": ["title", "tags"]}
    async with Client(build_server(with_providers(plain, provider(openai_fake, "p", FAST)))) as client:
        result = await client.call_tool("complete", {"messages": [{"role": "user", "content": "describe"}], "json_schema": schema, "task": "bulk"})
    assert result.structured_content["parsed"] == {"title": "Router", "tags": ["mcp"]}


async def test_route_explains_the_decision_without_calling_anyone(plain, openai_fake):
    async with Client(build_server(with_providers(plain, provider(openai_fake, "p", FAST, DEEP)))) as client:
        decision = (await client.call_tool("route", {"task": "reasoning", "prompt": "prove it"})).structured_content
    assert [s["model"] for s in decision["chain"]] == ["deep", "fast"]
    assert "quality=balanced" in decision["explanation"] and openai_fake.calls() == []


async def test_the_provider_stream_reaches_the_caller_as_progress(plain, openai_fake):
    openai_fake.script("fast", ok("streamed through the router to you"))
    pieces: list[str] = []

    async def on_progress(value, total, message):
        pieces.append(message)

    # Over a real transport, where the caller's progress token travels in the request.
    env = {**os.environ, "HYDRABRAIN_ROUTER_MOUNT": "[]", "HYDRABRAIN_LOG_LEVEL": "WARNING",
           "HYDRABRAIN_ROUTER_PROVIDERS": json.dumps([provider(openai_fake, "p", FAST).model_dump()])}
    params = StdioServerParameters(command=sys.executable, args=["-m", "hydrabrain.servers.cli", "serve", "router"], env=env)
    async with Client(params) as client:
        result = await client.call_tool("complete", {"prompt": "go"}, progress_callback=on_progress)
    assert result.structured_content["text"] == "streamed through the router to you"
    assert len(pieces) > 1 and "".join(pieces) == "streamed through the router to you"
    assert openai_fake.calls()[0].body["stream"] is True


def test_the_cli_prints_a_route_and_the_ledger(plain, openai_fake, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_fake.base_url)
    monkeypatch.setenv("OPENAI_MODEL", "cli-model")
    assert cli_main(["router", "route", "code", "write a parser"]) == 0
    assert '"model": "cli-model"' in capsys.readouterr().out
    assert cli_main(["router", "complete", "hi there"]) == 0
    assert capsys.readouterr().out.strip() == "cli-model says: hi there"
    assert cli_main(["router", "usage"]) == 0
    assert "1 calls" in capsys.readouterr().out
