"""The LLM routing library against real HTTP servers speaking the OpenAI and Anthropic APIs."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from fake_providers import anthropic_fake, hang, malformed, ok, openai_fake, provider, status, with_providers  # noqa: F401

from hydrabrain.shared.config import BudgetConfig, ModelPrice
from hydrabrain.shared.llm import LLMError, llm_from_settings

pytestmark = pytest.mark.anyio

CHEAP = ModelPrice(name="cheap", input_per_mtok=0.1, output_per_mtok=0.4, context_window=4000, tasks={"general": 1, "bulk": 2, "summarise": 2})
SMART = ModelPrice(name="smart", input_per_mtok=3.0, output_per_mtok=15.0, context_window=100_000, tasks={"general": 3, "reasoning": 3, "code": 3})
CODER = ModelPrice(name="coder", input_per_mtok=10.0, output_per_mtok=30.0, context_window=100_000, tasks={"code": 2})
CLAUDE = ModelPrice(name="claude", input_per_mtok=1.0, output_per_mtok=5.0, context_window=200_000, tasks={"general": 2, "reasoning": 2, "code": 3})


def test_with_no_provider_configured_the_suite_runs_in_plain_mode(settings, monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert llm_from_settings(settings) is None


async def test_the_conventional_openai_variables_define_a_provider(settings, monkeypatch, openai_fake):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_fake.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    monkeypatch.setenv("OPENAI_MODEL", "local-model")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    llm = llm_from_settings(settings)
    result = await llm.complete(prompt="hello there", feature="tests.env")
    assert result.text == "local-model says: hello there"
    assert result.provider == "openai"
    assert openai_fake.calls()[0].headers["authorization"] == "Bearer sk-test-secret"


async def test_the_conventional_anthropic_variables_define_a_provider(settings, monkeypatch, anthropic_fake):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "ak-test-secret")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_fake.base_url)
    llm = llm_from_settings(settings)
    result = await llm.complete(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert result.provider == "anthropic" and result.text.endswith("says: hi")
    sent = anthropic_fake.calls()[0]
    assert sent.headers["x-api-key"] == "ak-test-secret" and sent.headers["anthropic-version"]
    assert sent.body["system"] == "be brief" and all(m["role"] != "system" for m in sent.body["messages"])
    assert result.cost_usd > 0  # default model carries list prices


async def test_tokens_and_cost_come_from_the_providers_usage_and_the_configured_prices(settings, openai_fake):
    openai_fake.script("smart", ok("fine", input_tokens=1000, output_tokens=200))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "hosted", SMART)))
    result = await llm.complete(prompt="think hard", task="reasoning")
    assert (result.input_tokens, result.output_tokens) == (1000, 200)
    assert result.cost_usd == pytest.approx(1000 * 3.0 / 1e6 + 200 * 15.0 / 1e6)


async def test_a_429_is_retried_after_the_retry_after_the_provider_asked_for(settings, openai_fake):
    openai_fake.script("cheap", status(429, retry_after="1"))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    result = await llm.complete(prompt="again", feature="t")
    first, second = openai_fake.calls("cheap")
    assert result.text == "cheap says: again" and result.fallbacks_tried == []
    assert second.at - first.at >= 0.95


async def test_a_retry_after_longer_than_the_limit_falls_back_and_cools_the_model_down(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", status(429, retry_after="120"))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE), quality="cheapest"))
    result = await llm.complete(prompt="x")
    assert result.model == "claude" and "429" in result.fallbacks_tried[0]
    assert len(openai_fake.calls("cheap")) == 1
    report = {r["model"]: r for r in llm.provider_report()}
    assert report["cheap"]["cooldown_s"] > 100 and not report["cheap"]["healthy"]
    again = await llm.complete(prompt="y")
    assert again.model == "claude" and len(openai_fake.calls("cheap")) == 1
    assert "cooling down" in llm.route(task="general", prompt="z").explain()


async def test_server_errors_are_retried_then_the_chain_falls_back(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", status(500), status(502), status(503))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE), quality="cheapest", max_retries=2))
    result = await llm.complete(prompt="x")
    assert len(openai_fake.calls("cheap")) == 3
    assert result.provider == "a" and result.fallbacks_tried == ["p/cheap (HTTP 503 server: server error {\"error\": {\"type\": \"scripted\", \"message\": \"scripted 503\"}}, after 2 retries)"]


async def test_repeated_failures_put_a_deployment_in_cooldown(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", *[status(500)] * 3)
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE),
                                           quality="cheapest", max_retries=0, cooldown_after_failures=3))
    for _ in range(4):
        assert (await llm.complete(prompt=f"q{_}")).provider == "a"
    assert len(openai_fake.calls("cheap")) == 3


async def test_a_provider_that_does_not_answer_in_time_is_a_timeout_and_falls_back(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", hang(1.5))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP, timeout_s=0.3), provider(anthropic_fake, "a", CLAUDE),
                                           quality="cheapest", max_retries=0))
    result = await llm.complete(prompt="x")
    assert result.provider == "a" and "timeout" in result.fallbacks_tried[0]


async def test_a_malformed_body_falls_back_without_sending_the_request_again(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", malformed())
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE), quality="cheapest"))
    result = await llm.complete(prompt="x")
    assert result.provider == "a" and "malformed" in result.fallbacks_tried[0]
    assert len(openai_fake.calls("cheap")) == 1


async def test_a_bad_api_key_is_not_retried_and_never_appears_in_errors_or_the_ledger(settings, openai_fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-very-secret-123")
    openai_fake.script("cheap", status(401, message="Incorrect API key provided: sk-very-secret-123"))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP, key_env="FAKE_KEY")))
    with pytest.raises(LLMError, match="every model in the chain failed.*401 auth.*API key") as failure:
        await llm.complete(prompt="x")
    assert len(openai_fake.calls("cheap")) == 1
    assert "sk-very-secret-123" not in str(failure.value) and "***" in str(failure.value)
    db = sqlite3.connect(settings.data_dir("router") / "ledger.sqlite")
    assert not any("sk-very-secret" in (row[0] or "") for row in db.execute("SELECT error FROM calls"))
    assert llm.provider_report()[0]["key_present"] is True


async def test_an_answer_that_breaks_the_schema_is_repaired_with_the_validation_error(settings, openai_fake):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    openai_fake.script("cheap", ok('{"n": "three"}'), ok('```json\n{"n": 3}\n```'))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    result = await llm.complete(prompt="count", json_schema=schema)
    assert result.parsed == {"n": 3}
    repair = openai_fake.calls("cheap")[1].body["messages"]
    assert repair[-2] == {"role": "assistant", "content": '{"n": "three"}'}
    assert "'three' is not of type 'integer'" in repair[-1]["content"]


async def test_an_answer_that_stays_invalid_falls_back_along_the_chain(settings, openai_fake, anthropic_fake):
    schema = {"type": "array", "items": {"type": "string"}}
    openai_fake.script("cheap", ok("no json here"), ok("still prose"))
    anthropic_fake.script("claude", ok('["a", "b"]'))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE), quality="cheapest"))
    result = await llm.complete(prompt="list", json_schema=schema)
    assert result.parsed == ["a", "b"] and result.provider == "a"
    assert "broke the JSON schema" in result.fallbacks_tried[0]


async def test_the_caller_gets_a_clear_failure_when_no_model_returns_valid_json(settings, openai_fake):
    openai_fake.script("cheap", ok("nope"), ok("nope again"))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    with pytest.raises(LLMError, match="broke the JSON schema"):
        await llm.complete(prompt="x", json_schema={"type": "object"})


async def test_an_invalid_schema_or_empty_prompt_is_refused_before_any_call(settings, openai_fake):
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        await llm.complete(prompt="x", json_schema={"type": "nonsense"})
    with pytest.raises(ValueError, match="exactly one of"):
        await llm.complete()
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        await llm.complete(messages=[{"role": "robot", "content": "x"}])
    assert openai_fake.calls() == []


async def test_routing_follows_task_context_length_and_the_quality_setting(settings, openai_fake, anthropic_fake):
    base = (provider(openai_fake, "p", CHEAP, SMART, CODER), provider(anthropic_fake, "a", CLAUDE))
    balanced = llm_from_settings(with_providers(settings, *base, quality="balanced"))
    assert balanced.route("code", "write a parser").chain[0].deployment.key == "a/claude"  # tier 3, cheaper than smart
    assert balanced.route("bulk", "tag these").chain[0].deployment.key == "p/cheap"
    assert "does not serve task 'bulk'" in balanced.route("bulk", "x").excluded["p/coder"]
    long_prompt = "word " * 20_000
    decision = balanced.route("general", long_prompt)
    assert "p/cheap" in decision.excluded and "context window" in decision.explain()
    best = llm_from_settings(with_providers(settings, *base, quality="best"))
    assert best.route("general", "x").chain[0].deployment.key == "p/smart"
    cheapest = llm_from_settings(with_providers(settings, *base, quality="cheapest"))
    assert [c.deployment.key for c in cheapest.route("general", "x").chain] == ["p/cheap", "a/claude", "p/smart"]
    assert openai_fake.calls() == [] and anthropic_fake.calls() == []


async def test_every_call_is_written_to_the_ledger_with_tenant_feature_and_cost(settings, openai_fake):
    openai_fake.script("cheap", status(500), ok("done", input_tokens=10, output_tokens=5))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    await llm.complete(prompt="x", tenant="acme", feature="wiki.synthesis")
    db = sqlite3.connect(settings.data_dir("router") / "ledger.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute("SELECT tenant, feature, model, outcome, input_tokens, output_tokens FROM calls ORDER BY id").fetchall()
    assert rows == [("acme", "wiki.synthesis", "cheap", "error", 0, 0), ("acme", "wiki.synthesis", "cheap", "ok", 10, 5)]
    summary = llm.ledger.summary(tenant="acme")
    assert sum(r["cost_usd"] for r in summary) == pytest.approx((10 * 0.1 + 5 * 0.4) / 1e6)


async def test_a_budget_refuses_a_call_that_would_exceed_it_with_a_clear_error(settings, openai_fake):
    openai_fake.script("smart", ok("pricey", input_tokens=100_000, output_tokens=1000))
    budget = BudgetConfig(tenant="acme", period="day", limit_usd=0.5)
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", SMART), budgets=[budget], exact_cache=False))
    await llm.complete(prompt="first", tenant="acme")  # spends $0.315
    with pytest.raises(LLMError, match=r"budget exceeded: the day budget for tenant=acme \(\$0.5000\) has \$0.3150 spent"):
        await llm.complete(prompt="y" * 320_000, tenant="acme")
    assert (await llm.complete(prompt="y" * 320_000, tenant="other")).text  # other tenants are not limited
    assert len(openai_fake.calls()) == 2


async def test_a_budget_steers_to_a_cheaper_model_that_still_fits(settings, openai_fake):
    budget = BudgetConfig(feature="memory.extract", period="month", limit_usd=0.001)
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP, SMART), budgets=[budget], quality="best"))
    result = await llm.complete(prompt="z" * 2000, feature="memory.extract")
    assert result.model == "cheap" and "refused" in result.fallbacks_tried[0]


async def test_identical_prompts_are_answered_from_the_exact_cache_per_tenant(settings, openai_fake):
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP)))
    first = await llm.complete(prompt="same", tenant="t1")
    second = await llm.complete(prompt="same", tenant="t1")
    third = await llm.complete(prompt="same", tenant="t2")
    assert second.cached == "exact" and second.text == first.text and second.cost_usd == 0
    assert third.cached is None
    assert len(openai_fake.calls()) == 2


async def test_the_semantic_cache_answers_paraphrases_but_never_across_tenants(settings, openai_fake):
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), semantic_cache=True, semantic_cache_threshold=0.85))
    await llm.complete(prompt="How do I reset my password?", tenant="alpha")
    hit = await llm.complete(prompt="How can I reset my password?", tenant="alpha")
    assert hit.cached == "semantic" and hit.text == "cheap says: How do I reset my password?"
    other = await llm.complete(prompt="How can I reset my password?", tenant="beta")
    assert other.cached is None and other.text == "cheap says: How can I reset my password?"
    unrelated = await llm.complete(prompt="What is the boiling point of water?", tenant="alpha")
    assert unrelated.cached is None
    assert len(openai_fake.calls()) == 3


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_streaming_passes_text_through_as_it_arrives(settings, openai_fake, anthropic_fake, kind):
    fake = openai_fake if kind == "openai" else anthropic_fake
    fake.script("claude", ok("a fairly long streamed answer", input_tokens=7, output_tokens=6))
    llm = llm_from_settings(with_providers(settings, provider(fake, "s", CLAUDE)))
    pieces, final = [], None
    async for event in llm.stream(prompt="go"):
        if event.completion is not None:
            final = event.completion
        else:
            pieces.append(event.text)
    assert len(pieces) > 1 and "".join(pieces) == "a fairly long streamed answer"
    assert final.text == "".join(pieces) and (final.input_tokens, final.output_tokens) == (7, 6)
    assert json.loads(json.dumps(final.model_dump()))["provider"] == "s"


async def test_a_stream_falls_back_when_the_first_model_fails_before_any_text(settings, openai_fake, anthropic_fake):
    openai_fake.script("cheap", status(500))
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), provider(anthropic_fake, "a", CLAUDE), quality="cheapest"))
    events = [e async for e in llm.stream(prompt="go")]
    assert events[-1].completion.provider == "a" and "500" in events[-1].completion.fallbacks_tried[0]


async def test_a_cached_answer_expires_after_the_cache_ttl(settings, openai_fake):
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", CHEAP), cache_ttl_s=0.3))
    await llm.complete(prompt="fresh?")
    assert (await llm.complete(prompt="fresh?")).cached == "exact"
    time.sleep(0.4)
    assert (await llm.complete(prompt="fresh?")).cached is None
    assert len(openai_fake.calls()) == 2


async def test_a_spent_budget_still_lets_a_free_local_model_answer(settings, openai_fake):
    local = ModelPrice(name="local", context_window=8192, tasks={"general": 1})
    openai_fake.script("smart", ok("paid", input_tokens=10_000, output_tokens=1000))
    budget = BudgetConfig(period="total", limit_usd=0.01)
    llm = llm_from_settings(with_providers(settings, provider(openai_fake, "p", SMART, local), budgets=[budget], quality="best", exact_cache=False))
    assert (await llm.complete(prompt="first")).model == "smart"  # $0.045: the budget is now spent
    second = await llm.complete(prompt="second")
    assert second.model == "local" and second.cost_usd == 0 and "refused" in second.fallbacks_tried[0]


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    from email.utils import formatdate

    from hydrabrain.shared.llm.providers import parse_retry_after

    assert parse_retry_after("3") == 3.0
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10.5
    assert parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
