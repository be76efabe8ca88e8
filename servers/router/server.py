"""The router's MCP surface: the suite (and any external MCP server) behind one endpoint, plus model routing.

Own tools stay few (complete, route, usage, providers, mounts); mounted servers' tools, resources,
templates and prompts are merged in by `AggregatingMiddleware` under their prefixes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from hydrabrain.shared.config import Settings
from hydrabrain.shared.llm import LLM, Completion, Ledger, LLMError, llm_from_settings
from hydrabrain.shared.auth import ADMIN, ToolScopes, current_caller
from hydrabrain.shared.serving import new_server

from .aggregation import Aggregator, AggregatingMiddleware, Mount, external_mount, suite_mounts
from .core import (
    NO_PROVIDER,
    ProvidersReport,
    RouteReport,
    RouterError,
    UsageReport,
    messages_arg,
    plain_route,
    providers_report,
    report_route,
    usage_report,
)

OWN_TOOLS = frozenset({"complete", "route", "usage", "providers", "mounts"})

INSTRUCTIONS = """One endpoint for the whole hydrabrain suite. Tools of mounted servers carry their server's prefix
(wiki_..., memory_..., crag_..., loop_..., and any external server's prefix); their resources and prompts are here too.
The router's own tools: complete (ask an LLM through the routing policy, with fallbacks, budgets and a cost ledger),
route (which model a task would go to and why, without calling it), usage (spend from the ledger), providers (health,
cooldowns and spend per model) and mounts (each mounted server's state; restart one)."""

TaskArg = Annotated[str, Field(description="Task type: general, reasoning, code, agent, bulk, summarise, extract, classify")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class MountStatus(BaseModel):
    prefix: str
    source: str = Field(description="suite, stdio, http or in-process")
    state: str = Field(description="up, starting, down or stopped")
    restarts: int
    last_error: str | None
    tools: list[str] = Field(description="Exposed tool names")
    resources: int
    templates: int
    prompts: int


class MountsReport(BaseModel):
    mounts: list[MountStatus]
    restarted: str | None = Field(None, description="The mount a restart was requested for")


@dataclass
class RouterState:
    settings: Settings
    llm: LLM | None
    ledger: Ledger
    aggregator: Aggregator


def _state(ctx: Context) -> RouterState:
    return ctx.request_context.lifespan_context


def build_server(settings: Settings, extra_mounts: list[Mount] | None = None) -> MCPServer[Any]:
    """The router server; `extra_mounts` adds in-process servers (embedding applications, tests)."""

    @asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[RouterState]:
        llm = llm_from_settings(settings)
        ledger = llm.ledger if llm is not None else Ledger(settings.data_dir("router") / "ledger.sqlite")
        mounts = [*suite_mounts(settings),
                  *(external_mount(d, settings.router.call_timeout_s) for d in settings.router.downstream),
                  *(extra_mounts or [])]
        aggregator = Aggregator(mounts, hide=settings.router.hide, rename=settings.router.rename, reserved=set(OWN_TOOLS))
        try:
            async with aggregator.running():
                yield RouterState(settings, llm, ledger, aggregator)
        finally:
            if llm is not None:
                await llm.aclose()
            ledger.close()

    # Tools of mounted servers are checked by those servers, with the caller the router forwards.
    scopes = ToolScopes("router")
    server = new_server("router", instructions=INSTRUCTIONS, lifespan=lifespan, settings=settings, scopes=scopes)
    server.middleware.append(AggregatingMiddleware(lambda ctx: getattr(ctx.lifespan_context, "aggregator", None)))

    @server.tool()
    @scopes.need("router:complete")
    async def complete(
        ctx: Context,
        prompt: Annotated[str | None, Field(description="The prompt; give this or messages")] = None,
        messages: Annotated[list[Message] | None, Field(description="A conversation of {role, content}; give this or prompt")] = None,
        task: TaskArg = "general",
        max_tokens: Annotated[int | None, Field(ge=1, description="Longest answer in tokens")] = None,
        json_schema: Annotated[dict[str, Any] | None, Field(description="JSON Schema the answer must validate against; the answer is returned parsed")] = None,
        tenant: Annotated[str | None, Field(description="Who the spend is attributed to (budgets and caches are per tenant)")] = None,
        feature: Annotated[str | None, Field(description="What the call is for, for attribution (like 'wiki.synthesis')")] = None,
    ) -> Completion:
        """Ask an LLM through the routing policy; returns the answer, model, tokens, cost and fallbacks tried."""
        state = _state(ctx)
        if state.llm is None:
            raise ToolError(NO_PROVIDER)
        tenant = _tenant_for(tenant)
        msgs = messages_arg(messages)
        try:
            meta = ctx.request_context.meta or {}
            wants_progress = meta.get("progress_token", meta.get("progressToken")) is not None
            if json_schema is None and wants_progress:
                # The caller asked for progress: pass the provider's stream through as progress messages.
                final: Completion | None = None
                pieces = 0
                async for event in state.llm.stream(prompt=prompt, messages=msgs, task=task, max_tokens=max_tokens, tenant=tenant, feature=feature):
                    if event.completion is not None:
                        final = event.completion
                    else:
                        pieces += 1
                        await ctx.report_progress(pieces, None, event.text)
                if final is None:
                    raise ToolError("the provider's stream ended without a final answer; retry the call")
                return final
            return await state.llm.complete(prompt=prompt, messages=msgs, task=task, max_tokens=max_tokens,
                                            json_schema=json_schema, tenant=tenant, feature=feature)
        except (LLMError, ValueError) as exc:
            raise ToolError(str(exc)) from exc

    @server.tool()
    @scopes.need("router:complete")
    async def route(
        ctx: Context,
        task: TaskArg = "general",
        prompt: Annotated[str, Field(description="The prompt (its length decides which context windows fit)")] = "",
        max_tokens: Annotated[int | None, Field(ge=1, description="Longest answer in tokens")] = None,
    ) -> RouteReport:
        """Which models a call would go to, in order, and why; calls nothing."""
        state = _state(ctx)
        if state.llm is None:
            return plain_route(task)
        return report_route(state.llm.route(task=task, prompt=prompt or None, max_tokens=max_tokens))

    @server.tool()
    @scopes.need("router:complete")
    async def usage(
        ctx: Context,
        tenant: Annotated[str | None, Field(description="Only this tenant's calls")] = None,
        since: Annotated[str | None, Field(description="'24h', '7d', 'today', 'month', or an ISO date; unset means all time")] = None,
    ) -> UsageReport:
        """Spend from the ledger: calls, tokens, cost and latency by tenant, feature and model, with budgets."""
        state = _state(ctx)
        caller = current_caller()
        if caller is not None and not caller.allows(ADMIN):
            tenant = _tenant_for(tenant)  # a caller sees their own spend; everyone's needs the admin scope
        try:
            return usage_report(state.ledger, state.settings, tenant=tenant, since=since)
        except RouterError as exc:
            raise ToolError(str(exc)) from exc

    @server.tool()
    @scopes.need("router:complete")
    async def providers(ctx: Context) -> ProvidersReport:
        """Each configured model's health, cooldown and spend this month."""
        state = _state(ctx)
        return providers_report(state.llm, state.settings)

    @server.tool()
    @scopes.need("router:complete")
    async def mounts(
        ctx: Context,
        restart: Annotated[str | None, Field(description="Prefix of a mounted server to restart now")] = None,
    ) -> MountsReport:
        """The mounted servers: state, restarts, last error and exposed tools; optionally restart one."""
        agg = _state(ctx).aggregator
        caller = current_caller()
        if restart is not None and caller is not None and not caller.allows(ADMIN):
            raise ToolError(f"restarting a mounted server needs the '{ADMIN}' scope")
        if restart is not None:
            if restart not in agg.downstreams:
                raise ToolError(f"no mount with prefix {restart!r}; mounted: {', '.join(agg.downstreams) or 'none'}")
            agg.request_restart(restart, "restart requested")
            await agg.wait_ready(restart)
        return MountsReport(mounts=[MountStatus(**s) for s in agg.status()], restarted=restart)

    return server


def _tenant_for(tenant: str | None) -> str | None:
    """Spend is the caller's: an authenticated call is attributed to its user unless an admin names another."""
    caller = current_caller()
    if caller is None or caller.allows(ADMIN) and tenant:
        return tenant
    if tenant and tenant != caller.user:
        raise ToolError(f"this token acts for {caller.user!r}; attributing spend to {tenant!r} needs the '{ADMIN}' scope")
    return caller.user
