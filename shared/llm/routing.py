"""The LLM client every server uses: route, call with retries and fallbacks, validate, cache, bill.

    llm = llm_from_settings(settings)          # None when no provider is configured
    result = await llm.complete(prompt="...", task="summarise", feature="wiki.synthesis")

Reliability rules: a retryable failure (429, 5xx, timeout, refused connection) is retried on the
same deployment after Retry-After or an exponential backoff; anything else moves down the chain.
A deployment that fails `cooldown_after_failures` times in a row, or asks to wait longer than
`max_retry_wait_s`, is skipped for a cooldown. A deployment that answered is never sent the same
request again: a broken JSON answer is repaired by a new request that quotes the validation error,
and a body that is not the API's JSON falls back rather than retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import jsonschema
from pydantic import BaseModel, Field

from hydrabrain.shared.config import ModelPrice, ProviderConfig, RouterConfig, Settings
from hydrabrain.shared.llm.ledger import CallRecord, Ledger, period_start
from hydrabrain.shared.llm.policy import Candidate, Deployment, RouteDecision, estimate_tokens, rank
from hydrabrain.shared.llm.providers import Provider, ProviderError, RawAnswer
from hydrabrain.shared.telemetry import get_logger, log_event

log = get_logger("llm")
ROLES = frozenset({"system", "user", "assistant"})
DEFAULT_TENANT = "default"


class LLMError(RuntimeError):
    """No answer: every model in the chain failed, or a budget refused the call. The message says how to fix it."""


class Completion(BaseModel):
    text: str = Field(description="The answer text")
    parsed: Any = Field(None, description="The answer as JSON when a schema was given (validated against it)")
    model: str = Field(description="Model that answered")
    provider: str = Field(description="Provider that answered")
    input_tokens: int = Field(0, description="Prompt tokens billed")
    output_tokens: int = Field(0, description="Answer tokens billed")
    cost_usd: float = Field(0.0, description="Cost of this call, every attempt included")
    fallbacks_tried: list[str] = Field(default_factory=list, description="Deployments tried before the one that answered, each with why it failed")
    cached: str | None = Field(None, description="'exact' or 'semantic' when the answer came from a cache")
    latency_ms: float = Field(0.0, description="Wall time of the call")
    route: str = Field("", description="Why the router chose this chain")


@dataclass
class Health:
    """What the router knows about one deployment in this process."""

    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    last_error: str | None = None
    last_latency_ms: float | None = None

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now


@dataclass
class StreamEvent:
    """A streamed piece of text; the last event carries the finished `completion`."""

    text: str
    completion: Completion | None = None


# --- providers from settings and the environment --------------------------------------------------

# List prices (USD per million tokens) for the models the conventional variables pick by default.
_DEFAULT_OPENAI = ModelPrice(name="gpt-4o-mini", input_per_mtok=0.15, output_per_mtok=0.60, context_window=128_000, tasks={"general": 2, "bulk": 2, "summarise": 2, "code": 2, "reasoning": 1})
_DEFAULT_ANTHROPIC = ModelPrice(name="claude-sonnet-4-5", input_per_mtok=3.0, output_per_mtok=15.0, context_window=200_000, tasks={"general": 3})


def providers_from_environment(env: dict[str, str] | None = None) -> list[ProviderConfig]:
    """OPENAI_BASE_URL/OPENAI_API_KEY and ANTHROPIC_API_KEY/ANTHROPIC_BASE_URL, as other tools read them."""
    env = dict(os.environ) if env is None else env
    found: list[ProviderConfig] = []
    if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL"):
        name = env.get("OPENAI_MODEL")
        model = _DEFAULT_OPENAI if not name or name == _DEFAULT_OPENAI.name else ModelPrice(name=name, context_window=32_768)
        found.append(ProviderConfig(
            name="openai", kind="openai", base_url=env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
            api_key_env="OPENAI_API_KEY", models=[model],
        ))
    if env.get("ANTHROPIC_API_KEY"):
        name = env.get("ANTHROPIC_MODEL")
        model = _DEFAULT_ANTHROPIC if not name or name == _DEFAULT_ANTHROPIC.name else ModelPrice(name=name, context_window=200_000)
        found.append(ProviderConfig(
            name="anthropic", kind="anthropic", base_url=env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
            api_key_env="ANTHROPIC_API_KEY", models=[model],
        ))
    return found


def backend_provider(settings: Settings) -> ProviderConfig:
    """The suite's own inference backend, free and small: bulk and summarising work at tier 1."""
    b = settings.backend
    return ProviderConfig(
        # A backend served with [auth] wants a bearer token (scope router:complete): the router sends this one.
        name="backend", kind="openai", base_url=f"http://{b.host}:{b.port}/v1", timeout_s=120.0, api_key_env="HYDRABRAIN_BACKEND_TOKEN",
        models=[ModelPrice(name=b.model, context_window=8192, tasks={"general": 1, "bulk": 1, "summarise": 1, "classify": 1, "extract": 1})],
    )


def provider_configs(settings: Settings) -> list[ProviderConfig]:
    configs = list(settings.router.providers) or providers_from_environment()
    if settings.router.backend and not any(p.name == "backend" for p in configs):
        configs.append(backend_provider(settings))
    return configs


def llm_from_settings(settings: Settings) -> LLM | None:
    """The suite's LLM client, or None when no provider is configured (plain mode)."""
    configs = provider_configs(settings)
    if not configs or not any(p.models for p in configs):
        return None
    return LLM(configs, settings.router, ledger=Ledger(settings.data_dir("router") / "ledger.sqlite"), settings=settings)


# --- helpers --------------------------------------------------------------------------------------


def normalise_messages(prompt: str | None, messages: list[dict[str, Any]] | None, json_schema: dict[str, Any] | None) -> list[dict[str, Any]]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of `prompt` (a string) or `messages` (a list of {role, content})")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("`prompt` is empty")
        msgs = [{"role": "user", "content": prompt}]
    else:
        if not messages:
            raise ValueError("`messages` is empty; give at least one {role: 'user', content: ...}")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: string}}, got {str(m)[:80]}")
            msgs.append({"role": m["role"], "content": m["content"]})
    if json_schema is not None:
        try:
            jsonschema.validators.validator_for(json_schema).check_schema(json_schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        instruction = (
            "Answer with a single JSON value and nothing else (no prose, no code fences) that validates "
            f"against this JSON Schema:\n{json.dumps(json_schema)}"
        )
        msgs = [{"role": "system", "content": instruction}, *msgs]
    return msgs


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """The JSON value in an answer, tolerating code fences and prose around one object or array."""
    stripped = text.strip()
    for candidate in (stripped, *(_FENCE.findall(stripped))):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
    if starts:
        start = min(starts)
        end = max(stripped.rfind("}"), stripped.rfind("]"))
        if end > start:
            return json.loads(stripped[start:end + 1])
    raise json.JSONDecodeError("no JSON value found", stripped, 0)


def validation_problem(text: str, schema: dict[str, Any]) -> tuple[Any, str | None]:
    """(parsed, None) for a valid answer, else (None, what is wrong)."""
    try:
        parsed = extract_json(text)
    except json.JSONDecodeError as exc:
        return None, f"the answer is not JSON ({exc.msg})"
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        return None, f"at {where}: {error.message}"
    return parsed, None


def _cache_key(tenant: str, task: str, messages: list[dict[str, Any]], max_tokens: int | None) -> str:
    blob = json.dumps([tenant, task, messages, max_tokens], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- the client -----------------------------------------------------------------------------------


@dataclass
class _Attempt:
    """Accumulates one call's cost and failures across deployments."""

    started: float
    tried: list[str] = field(default_factory=list)
    cost: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


class LLM:
    """Routes completions across providers; one instance per process is enough, and it is task-safe."""

    def __init__(
        self,
        providers: list[ProviderConfig],
        config: RouterConfig,
        ledger: Ledger,
        settings: Settings | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.settings = settings
        self._sleep = sleep
        self.providers = {p.name: Provider(p) for p in providers}
        self.deployments = [Deployment(p, m) for p in providers for m in p.models]
        self.health: dict[str, Health] = {d.key: Health() for d in self.deployments}
        self._embedder: Any = None

    async def aclose(self) -> None:
        """Close this event loop's HTTP connections and the ledger."""
        for provider in self.providers.values():
            await provider.aclose()
        self.ledger.close()

    # --- decisions ------------------------------------------------------------------------------

    def route(self, task: str = "general", prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
              max_tokens: int | None = None, json_schema: dict[str, Any] | None = None) -> RouteDecision:
        """The chain a call would take now, with reasons, without calling anything."""
        msgs = normalise_messages(prompt, messages, json_schema) if (prompt or messages) else []
        decision = rank(self.deployments, task, estimate_tokens(msgs), max_tokens, self.config.quality)
        self._apply_cooldowns(decision)
        return decision

    def _apply_cooldowns(self, decision: RouteDecision) -> None:
        now = time.monotonic()
        cooling = [c for c in decision.chain if self.health[c.deployment.key].cooling(now)]
        if not cooling:
            return
        if len(cooling) == len(decision.chain):
            decision.reasons.append("Every eligible model is cooling down; trying them anyway rather than failing.")
            return
        for c in cooling:
            left = self.health[c.deployment.key].cooldown_until - now
            decision.excluded[c.deployment.key] = f"cooling down for {left:.0f} s after {self.health[c.deployment.key].last_error}"
            decision.reasons.append(f"Skipped {c.deployment.key}: cooling down ({left:.0f} s left).")
        decision.chain = [c for c in decision.chain if c not in cooling]

    def _budget_refusal(self, candidate: Candidate, tenant: str | None, feature: str | None) -> str | None:
        for budget in self.config.budgets:
            room = self.ledger.budget_room(budget, tenant, feature)
            if room is None:
                continue
            # A free model adds no spend, so a spent budget still lets it answer.
            if candidate.estimated_cost_usd > 0 and candidate.estimated_cost_usd > room:
                scope = ", ".join(f"{k}={v}" for k, v in (("tenant", budget.tenant), ("feature", budget.feature)) if v) or "all calls"
                spent = budget.limit_usd - room
                return (f"the {budget.period} budget for {scope} (${budget.limit_usd:.4f}) has ${spent:.4f} spent and "
                        f"{candidate.deployment.key} would cost ~${candidate.estimated_cost_usd:.6f}")
        return None

    # --- calls ----------------------------------------------------------------------------------

    async def complete(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        task: str = "general",
        max_tokens: int | None = None,
        json_schema: dict[str, Any] | None = None,
        tenant: str | None = None,
        feature: str | None = None,
    ) -> Completion:
        """One answer from the best deployment that can give it; raises LLMError when none can."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        msgs = normalise_messages(prompt, messages, json_schema)
        scope_tenant = tenant or DEFAULT_TENANT
        run = _Attempt(time.perf_counter())

        key = _cache_key(scope_tenant, task, msgs, max_tokens)
        if self.config.exact_cache:
            hit = self.ledger.exact_get(key, self.config.cache_ttl_s)
            if hit is not None:
                return self._from_cache(hit, "exact", tenant, feature, task, run)
        vector = None
        if self.config.semantic_cache and self.settings is not None:
            # Embedding is CPU work: keep it off the event loop so other requests keep flowing.
            vector, scope = await anyio.to_thread.run_sync(self._semantic_vector, task, msgs, max_tokens)
            found = self.ledger.semantic_get(scope_tenant, scope, vector, self.config.semantic_cache_threshold, self.config.cache_ttl_s)
            if found is not None:
                return self._from_cache(found[0], "semantic", tenant, feature, task, run)

        decision = rank(self.deployments, task, estimate_tokens(msgs), max_tokens, self.config.quality)
        self._apply_cooldowns(decision)
        if not decision.chain:
            raise LLMError(f"no configured model can serve this call: {decision.explain()} "
                           "Add a model with this task in its `tasks` map, or one with a larger context_window, under [[router.providers]].")
        refusals: list[str] = []
        for candidate in decision.chain:
            refusal = self._budget_refusal(candidate, tenant, feature)
            if refusal is not None:
                refusals.append(refusal)
                run.tried.append(f"{candidate.deployment.key} (refused: {refusal})")
                continue
            answer = await self._try_deployment(candidate, msgs, max_tokens, json_schema, tenant, feature, task, run)
            if answer is None:
                continue
            raw, parsed = answer
            completion = Completion(
                text=raw.text, parsed=parsed, model=candidate.deployment.model.name, provider=candidate.deployment.provider.name,
                input_tokens=run.input_tokens, output_tokens=run.output_tokens, cost_usd=round(run.cost, 10),
                fallbacks_tried=run.tried, latency_ms=(time.perf_counter() - run.started) * 1000, route=decision.explain(),
            )
            cached = completion.model_dump(include={"text", "parsed", "model", "provider"})
            if self.config.exact_cache:
                self.ledger.exact_put(key, scope_tenant, cached)
            if vector is not None:
                self.ledger.semantic_put(scope_tenant, scope, vector, cached)
            log_event(log, "llm call", task=task, tenant=tenant, feature=feature, model=completion.model, provider=completion.provider,
                      cost_usd=completion.cost_usd, latency_ms=round(completion.latency_ms, 1), fallbacks=len(run.tried))
            return completion

        log_event(log, "llm call failed", level=30, task=task, tenant=tenant, feature=feature, tried=run.tried)
        if refusals and len(refusals) == len(run.tried):
            self._record(CallRecord(tenant, feature, task, None, None, 0, 0, 0.0, 0.0, "refused", refusals[0]))
            raise LLMError(f"budget exceeded: {refusals[0]}. Raise limit_usd in [[router.budgets]], route to a cheaper "
                           "model (router.quality = 'cheapest'), or wait for the next period.")
        raise LLMError("every model in the chain failed: " + "; ".join(run.tried)
                       + ". Check each provider's base_url and API key variable, or add a fallback model under [[router.providers]].")

    async def _try_deployment(self, candidate: Candidate, msgs: list[dict[str, Any]], max_tokens: int | None,
                              json_schema: dict[str, Any] | None, tenant: str | None, feature: str | None, task: str,
                              run: _Attempt) -> tuple[RawAnswer, Any] | None:
        """Retries, then JSON repairs, on one deployment; None means fall back to the next."""
        dep = candidate.deployment
        provider = self.providers[dep.provider.name]
        health = self.health[dep.key]
        request = msgs
        repairs_left = self.config.json_repairs if json_schema is not None else 0
        retries = 0
        while True:
            started = time.perf_counter()
            try:
                raw = await provider.complete(dep.model.name, request, max_tokens)
            except ProviderError as exc:
                latency = (time.perf_counter() - started) * 1000
                self._failed(dep, health, exc)
                self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, 0, 0, 0.0, latency, "error", exc.short()))
                wait = self._retry_wait(exc, retries)
                if wait is None:
                    run.tried.append(f"{dep.key} ({exc.short()}{f', after {retries} retries' if retries else ''})")
                    return None
                retries += 1
                log_event(log, "retrying", deployment=dep.key, error=exc.short(), wait_s=round(wait, 3))
                await self._sleep(wait)
                continue
            latency = (time.perf_counter() - started) * 1000
            in_tok = raw.input_tokens if raw.input_tokens is not None else estimate_tokens(request)
            out_tok = raw.output_tokens if raw.output_tokens is not None else len(raw.text) // 4 + 1
            cost = dep.cost(in_tok, out_tok)
            run.cost += cost
            run.input_tokens += in_tok
            run.output_tokens += out_tok
            health.successes += 1
            health.consecutive_failures = 0
            health.last_latency_ms = latency
            if json_schema is None:
                self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, in_tok, out_tok, cost, latency, "ok"))
                return raw, None
            parsed, problem = validation_problem(raw.text, json_schema)
            if problem is None:
                self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, in_tok, out_tok, cost, latency, "ok"))
                return raw, parsed
            self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, in_tok, out_tok, cost, latency, "invalid_json", problem))
            if repairs_left <= 0:
                run.tried.append(f"{dep.key} (answer broke the JSON schema: {problem})")
                return None
            repairs_left -= 1
            # A new request, not a resend: the model sees its own answer and what is wrong with it.
            request = [*request, {"role": "assistant", "content": raw.text},
                       {"role": "user", "content": f"That answer does not validate against the schema: {problem}. "
                                                   "Reply with only the corrected JSON."}]

    def _retry_wait(self, exc: ProviderError, retries: int) -> float | None:
        """Seconds to wait before retrying the same deployment, or None to fall back now."""
        if not exc.retryable or retries >= self.config.max_retries:
            return None
        if exc.retry_after is not None:
            if exc.retry_after > self.config.max_retry_wait_s:
                return None
            return exc.retry_after
        base = self.config.backoff_s * (2 ** retries)
        return base * random.uniform(0.75, 1.25)

    def _failed(self, dep: Deployment, health: Health, exc: ProviderError) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = exc.short()
        now = time.monotonic()
        if exc.retry_after is not None and exc.retry_after > self.config.max_retry_wait_s:
            health.cooldown_until = max(health.cooldown_until, now + exc.retry_after)
        elif health.consecutive_failures >= self.config.cooldown_after_failures or exc.kind == "auth":
            health.cooldown_until = now + self.config.cooldown_s
        else:
            return
        log_event(log, "cooldown", deployment=dep.key, seconds=round(health.cooldown_until - now, 1), error=exc.short())

    def _record(self, rec: CallRecord) -> None:
        self.ledger.record(rec)

    def _from_cache(self, hit: dict[str, Any], kind: str, tenant: str | None, feature: str | None, task: str, run: _Attempt) -> Completion:
        latency = (time.perf_counter() - run.started) * 1000
        self._record(CallRecord(tenant, feature, task, hit.get("provider"), hit.get("model"), 0, 0, 0.0, latency, f"cache_{kind}"))
        return Completion(**hit, cached=kind, latency_ms=latency, route=f"answered from the {kind} cache")

    def _semantic_vector(self, task: str, msgs: list[dict[str, Any]], max_tokens: int | None) -> tuple[Any, str]:
        """Embed the conversation's user turns; the scope keeps system prompts, task and schema exact."""
        if self._embedder is None:
            from hydrabrain.shared.embeddings import get_embedder

            self._embedder = get_embedder(self.settings)
        fixed = [m for m in msgs if m["role"] != "user"]
        text = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        scope = hashlib.sha256(json.dumps([task, fixed, max_tokens], sort_keys=True).encode()).hexdigest()[:32]
        return self._embedder.embed([text])[0], scope

    # --- streaming ------------------------------------------------------------------------------

    async def stream(
        self,
        prompt: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        task: str = "general",
        max_tokens: int | None = None,
        tenant: str | None = None,
        feature: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Text as the provider sends it; falls back only until the first token has been passed on."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        msgs = normalise_messages(prompt, messages, None)
        run = _Attempt(time.perf_counter())
        decision = rank(self.deployments, task, estimate_tokens(msgs), max_tokens, self.config.quality)
        self._apply_cooldowns(decision)
        if not decision.chain:
            raise LLMError(f"no configured model can serve this call: {decision.explain()}")
        for candidate in decision.chain:
            dep = candidate.deployment
            refusal = self._budget_refusal(candidate, tenant, feature)
            if refusal is not None:
                run.tried.append(f"{dep.key} (refused: {refusal})")
                continue
            health = self.health[dep.key]
            started = time.perf_counter()
            sent_any = False
            try:
                async for delta in self.providers[dep.provider.name].stream(dep.model.name, msgs, max_tokens):
                    if delta.final is None:
                        sent_any = True
                        yield StreamEvent(delta.text)
                        continue
                    raw = delta.final
                    latency = (time.perf_counter() - started) * 1000
                    in_tok = raw.input_tokens if raw.input_tokens is not None else estimate_tokens(msgs)
                    out_tok = raw.output_tokens if raw.output_tokens is not None else len(raw.text) // 4 + 1
                    cost = dep.cost(in_tok, out_tok)
                    health.successes += 1
                    health.consecutive_failures = 0
                    self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, in_tok, out_tok, cost, latency, "ok"))
                    yield StreamEvent("", Completion(
                        text=raw.text, model=dep.model.name, provider=dep.provider.name, input_tokens=in_tok,
                        output_tokens=out_tok, cost_usd=cost, fallbacks_tried=run.tried,
                        latency_ms=(time.perf_counter() - run.started) * 1000, route=decision.explain(),
                    ))
                    return
            except ProviderError as exc:
                self._failed(dep, health, exc)
                self._record(CallRecord(tenant, feature, task, dep.provider.name, dep.model.name, 0, 0, 0.0,
                                        (time.perf_counter() - started) * 1000, "error", exc.short()))
                if sent_any:
                    raise LLMError(f"{dep.key} failed mid-stream ({exc.short()}); the partial answer above is incomplete") from None
                run.tried.append(f"{dep.key} ({exc.short()})")
        raise LLMError("every model in the chain failed to stream: " + "; ".join(run.tried))

    # --- reports --------------------------------------------------------------------------------

    def provider_report(self) -> list[dict[str, Any]]:
        """Each deployment's health, cooldown and spend this month."""
        now = time.monotonic()
        month = period_start("month")
        report = []
        for dep in self.deployments:
            h = self.health[dep.key]
            report.append({
                "provider": dep.provider.name, "model": dep.model.name, "kind": dep.provider.kind,
                "base_url": dep.provider.base_url,
                "key_present": bool(self.providers[dep.provider.name].api_key()) if dep.provider.api_key_env else None,
                "healthy": not h.cooling(now) and h.consecutive_failures == 0,
                "cooldown_s": round(max(0.0, h.cooldown_until - now), 1),
                "successes": h.successes, "failures": h.failures, "last_error": h.last_error,
                "last_latency_ms": h.last_latency_ms,
                "spend_month_usd": self.ledger.spend(provider=dep.provider.name, since=month),
                "tasks": dep.model.tasks or {"*": 1}, "context_window": dep.model.context_window,
            })
        return report
