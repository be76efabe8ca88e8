"""The router's domain answers as typed records: route decisions, usage reports, provider health.

No MCP here; the server adapts these, and the benchmark and CLI call them directly.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from hydrabrain.shared.config import Settings
from hydrabrain.shared.llm import LLM, Ledger, RouteDecision
from hydrabrain.shared.llm.ledger import period_start

NO_PROVIDER = (
    "no LLM provider is configured: set OPENAI_BASE_URL and/or OPENAI_API_KEY (any OpenAI-compatible endpoint), "
    "or ANTHROPIC_API_KEY, or list providers under [[router.providers]] in hydrabrain.toml "
    "(router.backend = true adds the suite's own inference backend)"
)


class RouterError(ValueError):
    """Bad input to a router operation; the message says what to send instead."""


class ChainStep(BaseModel):
    provider: str
    model: str
    tier: int = Field(description="Quality tier of the model for this task (higher is better)")
    estimated_cost_usd: float = Field(description="Estimated cost of this call on this model")


class RouteReport(BaseModel):
    task: str
    quality: str = Field(description="The cost-quality setting in force")
    estimated_input_tokens: int
    chain: list[ChainStep] = Field(description="Models in the order they would be tried")
    excluded: dict[str, str] = Field(description="provider/model -> why it is not in the chain")
    explanation: str


class UsageRow(BaseModel):
    tenant: str | None
    feature: str | None
    provider: str | None
    model: str | None
    outcome: str = Field(description="ok, error, invalid_json, refused, cache_exact or cache_semantic")
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    mean_latency_ms: float


class BudgetStatus(BaseModel):
    tenant: str | None
    feature: str | None
    period: str
    limit_usd: float
    spent_usd: float


class UsageReport(BaseModel):
    since: str = Field(description="Start of the window (UTC, ISO 8601)")
    tenant: str | None
    calls: int
    cost_usd: float
    cache_hits: int
    rows: list[UsageRow]
    budgets: list[BudgetStatus]


class ProviderHealth(BaseModel):
    provider: str
    model: str
    kind: str
    base_url: str
    key_present: bool | None = Field(description="Whether the API key variable is set (None when the provider needs no key)")
    healthy: bool
    cooldown_s: float = Field(description="Seconds until the model is tried again (0 when not cooling down)")
    successes: int
    failures: int
    last_error: str | None
    last_latency_ms: float | None
    spend_month_usd: float
    tasks: dict[str, int]
    context_window: int


class ProvidersReport(BaseModel):
    configured: bool = Field(description="False in plain mode (no provider configured)")
    quality: str
    providers: list[ProviderHealth]
    note: str = ""


def report_route(decision: RouteDecision) -> RouteReport:
    return RouteReport(
        task=decision.task, quality=decision.quality, estimated_input_tokens=decision.estimated_input_tokens,
        chain=[ChainStep(provider=c.deployment.provider.name, model=c.deployment.model.name, tier=c.tier,
                         estimated_cost_usd=round(c.estimated_cost_usd, 8)) for c in decision.chain],
        excluded=decision.excluded, explanation=decision.explain(),
    )


def plain_route(task: str) -> RouteReport:
    return RouteReport(task=task, quality="-", estimated_input_tokens=0, chain=[], excluded={}, explanation=NO_PROVIDER)


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(since: str | None, now: float | None = None) -> float:
    """'24h', '7d', 'today', 'month', an ISO date/time (UTC unless it says otherwise), or None for all time."""
    now = time.time() if now is None else now
    if since is None or not since.strip() or since.strip() == "all":
        return 0.0
    text = since.strip().lower()
    if text in ("today", "day"):
        return period_start("day", now)
    if text == "month":
        return period_start("month", now)
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(since.strip())
    except ValueError:
        raise RouterError(f"since={since!r} is not understood; use '24h', '7d', 'today', 'month' or an ISO date like 2026-11-01") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def usage_report(ledger: Ledger, settings: Settings, tenant: str | None = None, since: str | None = None) -> UsageReport:
    start = parse_since(since)
    rows = [UsageRow(**{k: (v if v is not None or k not in ("input_tokens", "output_tokens", "cost_usd", "mean_latency_ms") else 0) for k, v in r.items()})
            for r in ledger.summary(tenant=tenant, since=start)]
    budgets = []
    for b in settings.router.budgets:
        spent = ledger.spend(tenant=b.tenant, feature=b.feature, since=period_start(b.period))
        budgets.append(BudgetStatus(tenant=b.tenant, feature=b.feature, period=b.period, limit_usd=b.limit_usd, spent_usd=round(spent, 8)))
    return UsageReport(
        since=datetime.fromtimestamp(start, UTC).isoformat(), tenant=tenant,
        calls=sum(r.calls for r in rows), cost_usd=round(sum(r.cost_usd for r in rows), 8),
        cache_hits=sum(r.calls for r in rows if r.outcome.startswith("cache_")), rows=rows, budgets=budgets,
    )


def providers_report(llm: LLM | None, settings: Settings) -> ProvidersReport:
    if llm is None:
        return ProvidersReport(configured=False, quality=settings.router.quality, providers=[], note=NO_PROVIDER)
    return ProvidersReport(configured=True, quality=settings.router.quality,
                           providers=[ProviderHealth(**r) for r in llm.provider_report()])


def messages_arg(messages: list[Any] | None) -> list[dict[str, Any]] | None:
    if messages is None:
        return None
    return [m.model_dump() if isinstance(m, BaseModel) else dict(m) for m in messages]
