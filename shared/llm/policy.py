"""Routing policy: which deployments may serve a request, in what order, and why.

A deployment is one model at one provider. A model's `tasks` map says which task types it serves
and at what quality tier (higher is better); a model with an empty map serves every task at tier 1,
and a `general` entry covers tasks the map does not name. The cost-quality setting orders the
chain: `best` by tier, `cheapest` by estimated price, `balanced` takes the cheapest model within
one tier of the best for the task, then the rest by tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hydrabrain.shared.config import ModelPrice, ProviderConfig

TASKS = ("general", "reasoning", "code", "agent", "bulk", "summarise", "extract", "classify")
DEFAULT_OUTPUT_TOKENS = 256


@dataclass(frozen=True)
class Deployment:
    provider: ProviderConfig
    model: ModelPrice

    @property
    def key(self) -> str:
        return f"{self.provider.name}/{self.model.name}"

    def tier(self, task: str) -> int | None:
        """The model's quality tier for a task, or None when it does not serve it."""
        tasks = self.model.tasks
        if not tasks:
            return 1
        if task in tasks:
            return tasks[task]
        return tasks.get("general")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.model.input_per_mtok + output_tokens * self.model.output_per_mtok) / 1_000_000


@dataclass
class Candidate:
    deployment: Deployment
    tier: int
    estimated_cost_usd: float
    note: str = ""


@dataclass
class RouteDecision:
    """The ordered chain for one request and a sentence per choice."""

    task: str
    quality: str
    estimated_input_tokens: int
    chain: list[Candidate]
    excluded: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def explain(self) -> str:
        return " ".join(self.reasons)


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """About four characters per token, plus a little per message: no tokenizer for every provider."""
    chars = 0
    for message in messages:
        content = message.get("content", "")
        chars += len(content) if isinstance(content, str) else len(json.dumps(content))
    return chars // 4 + 4 * len(messages) + 1


def rank(
    deployments: list[Deployment],
    task: str,
    input_tokens: int,
    max_tokens: int | None,
    quality: str,
) -> RouteDecision:
    """Order the deployments that can serve this request; say why each one is in or out."""
    output_tokens = max_tokens or DEFAULT_OUTPUT_TOKENS
    needed = input_tokens + output_tokens
    decision = RouteDecision(task, quality, input_tokens, [])
    eligible: list[Candidate] = []
    seen: set[str] = set()
    for dep in deployments:
        if dep.key in seen:
            continue  # one request never goes twice to the same model through the chain
        seen.add(dep.key)
        tier = dep.tier(task)
        if tier is None:
            decision.excluded[dep.key] = f"does not serve task '{task}'"
            continue
        if dep.model.context_window < needed:
            decision.excluded[dep.key] = f"context window {dep.model.context_window} < ~{needed} tokens needed"
            continue
        eligible.append(Candidate(dep, tier, dep.cost(input_tokens, output_tokens)))
    if not eligible:
        decision.reasons.append(f"No configured model serves task '{task}' with ~{needed} tokens.")
        return decision

    by_tier = sorted(eligible, key=lambda c: (-c.tier, c.estimated_cost_usd))
    by_cost = sorted(eligible, key=lambda c: (c.estimated_cost_usd, -c.tier))
    top = by_tier[0].tier
    if quality == "best":
        chain = by_tier
        why = f"quality=best: highest tier for '{task}' first (tier {top})"
    elif quality == "cheapest":
        chain = by_cost
        why = f"quality=cheapest: lowest estimated cost first for '{task}'"
    else:
        near = [c for c in by_cost if c.tier >= top - 1]
        rest = [c for c in by_tier if c not in near]
        chain = near + rest
        why = f"quality=balanced: cheapest model within one tier of the best for '{task}' (tier {top})"
    for candidate in chain:
        candidate.note = f"tier {candidate.tier}, ~${candidate.estimated_cost_usd:.6f}"
    decision.chain = chain
    first = chain[0]
    decision.reasons.append(
        f"{why}; picked {first.deployment.key} ({first.note}) for ~{input_tokens} input + {output_tokens} output tokens."
    )
    if len(chain) > 1:
        decision.reasons.append("Fallbacks in order: " + ", ".join(c.deployment.key for c in chain[1:]) + ".")
    for key, why_not in decision.excluded.items():
        decision.reasons.append(f"Excluded {key}: {why_not}.")
    return decision
