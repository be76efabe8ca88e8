"""Mounting other MCP servers behind the router: one endpoint, prefixed names, supervised downstreams.

Each downstream (a suite server built in process, an external stdio command, or a streamable-HTTP
URL) lives in its own supervisor task, which owns the client connection, keeps the downstream's
listings, and restarts it after a crash, a hang, or on request. The router's MCP surface is
extended by `AggregatingMiddleware`, which answers list requests with the union of the router's
own items and every live downstream's, and forwards calls by name or URI. A downstream that is
down yields an error naming it; the others keep serving.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_PARAMS, CallToolResult, LoggingMessageNotificationParams, TextContent

from hydrabrain.shared.auth import CALLER_META_KEY, current_caller
from hydrabrain.shared.config import DownstreamConfig, Settings
from hydrabrain.shared.telemetry import get_logger, log_event

log = get_logger("router.mounts")
RESTART_BACKOFF_MAX_S = 30.0


class DownstreamDown(RuntimeError):
    """A downstream server cannot answer right now; the message names it and what happens next."""


@dataclass
class Mount:
    """How to reach one downstream and how its names appear upstream."""

    prefix: str
    connect: Callable[..., Client]  # called with logging_callback=...; returns a fresh, unentered Client
    source: str  # 'suite', 'stdio', 'http' or 'in-process'
    timeout_s: float = 300.0
    hide: frozenset[str] = frozenset()
    rename: dict[str, str] = field(default_factory=dict)


@dataclass
class Downstream:
    """A mounted server's live state, owned by its supervisor task."""

    mount: Mount
    state: str = "starting"  # starting | up | down | stopped
    client: Client | None = None
    tools: list[Any] = field(default_factory=list)
    resources: list[Any] = field(default_factory=list)
    templates: list[Any] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)
    last_error: str | None = None
    restarts: int = 0
    started_at: float | None = None
    ready: anyio.Event = field(default_factory=anyio.Event)
    restart: anyio.Event = field(default_factory=anyio.Event)
    inflight: list[Any] = field(default_factory=list)  # upstream request contexts, for log pass-through

    @property
    def prefix(self) -> str:
        return self.mount.prefix

    def exposed(self, name: str) -> str:
        return self.mount.rename.get(name) or f"{self.mount.prefix}_{name}"


def suite_mounts(settings: Settings) -> list[Mount]:
    """The suite's servers named in router.mount, built in process; those not installed are skipped."""
    from hydrabrain.shared import serving

    mounts: list[Mount] = []
    for name in settings.router.mount:
        if name == "router":
            continue
        try:
            server = serving.build(name, settings)
        except ValueError as exc:
            log_event(log, "mount skipped", level=30, server=name, reason=str(exc))
            continue

        def connect(server: Any = server, **kw: Any) -> Client:
            return Client(server, cache=None, **kw)

        mounts.append(Mount(prefix=name, connect=connect, source="suite", timeout_s=settings.router.call_timeout_s))
    return mounts


def external_mount(config: DownstreamConfig, default_timeout_s: float) -> Mount:
    if bool(config.command) == bool(config.url):
        raise ValueError(f"router.downstream '{config.prefix}' needs exactly one of `command` (stdio) or `url` (streamable HTTP)")
    if config.command:
        # The SDK starts the command with a minimal environment; pass on only what config names.
        env = {name: os.environ[name] for name in config.env if name in os.environ}
        params = StdioServerParameters(command=config.command[0], args=list(config.command[1:]), env=env or None)

        def connect(**kw: Any) -> Client:
            return Client(params, cache=None, **kw)

        source = "stdio"
    else:
        url = str(config.url)

        def connect(**kw: Any) -> Client:
            return Client(url, cache=None, **kw)

        source = "http"
    return Mount(
        prefix=config.prefix, connect=connect, source=source, timeout_s=config.timeout_s or default_timeout_s,
        hide=frozenset(config.hide), rename=dict(config.rename),
    )


class Aggregator:
    """All downstreams, their supervisors, and the name/URI routing tables."""

    def __init__(self, mounts: list[Mount], hide: list[str] | None = None, rename: dict[str, str] | None = None,
                 reserved: set[str] | None = None, startup_timeout_s: float = 30.0) -> None:
        prefixes = [m.prefix for m in mounts]
        duplicates = {p for p in prefixes if prefixes.count(p) > 1}
        if duplicates:
            raise ValueError(f"two mounts share the prefix {sorted(duplicates)}; give each downstream its own prefix")
        self.downstreams = {m.prefix: Downstream(m) for m in mounts}
        self.hide = set(hide or [])
        self.rename = dict(rename or {})
        self.reserved = set(reserved or set())
        self.startup_timeout_s = startup_timeout_s
        self._tool_table: tuple[tuple[int, ...], dict[str, tuple[Downstream, Any]]] | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self):  # noqa: ANN201 - an async context manager of self
        async with anyio.create_task_group() as tg:
            for ds in self.downstreams.values():
                tg.start_soon(self._supervise, ds)
            with anyio.move_on_after(self.startup_timeout_s):
                for ds in self.downstreams.values():
                    await ds.ready.wait()
            try:
                yield self
            finally:
                for ds in self.downstreams.values():
                    ds.state = "stopped"
                tg.cancel_scope.cancel()

    async def _supervise(self, ds: Downstream) -> None:
        backoff = 0.5
        while ds.state != "stopped":
            ds.restart = anyio.Event()
            error: str | None = None
            try:
                # The deadline covers start-up only; it is lifted once the listings are in.
                with anyio.CancelScope(deadline=anyio.current_time() + self.startup_timeout_s) as scope:
                    async with ds.mount.connect(logging_callback=self._log_forwarder(ds), log_level="info") as client:
                        await self._refresh(ds, client)
                        scope.deadline = math.inf
                        ds.client, ds.state, ds.last_error, ds.started_at = client, "up", None, time.time()
                        backoff = 0.5
                        log_event(log, "downstream up", prefix=ds.prefix, source=ds.mount.source, tools=len(ds.tools))
                        ds.ready.set()
                        await ds.restart.wait()
                        ds.client = None
                if scope.cancelled_caught:
                    error = f"did not start within {self.startup_timeout_s:g} s"
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # noqa: BLE001 - a downstream's failure must never end the router
                error = _describe(exc)
            ds.client = None
            if ds.state == "stopped":
                return
            if error is not None:
                ds.state = "down"
                ds.last_error = error
                log_event(log, "downstream down", level=30, prefix=ds.prefix, error=error)
                ds.ready.set()
                with anyio.move_on_after(backoff):
                    await ds.restart.wait()
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            ds.restarts += 1
            ds.state = "starting"

    async def _refresh(self, ds: Downstream, client: Client) -> None:
        caps = client.server_capabilities
        ds.tools = await _all_pages(client.list_tools, "tools") if caps.tools else []
        ds.resources = await _all_pages(client.list_resources, "resources") if caps.resources else []
        ds.templates = await _all_pages(client.list_resource_templates, "resource_templates") if caps.resources else []
        ds.prompts = await _all_pages(client.list_prompts, "prompts") if caps.prompts else []

    async def refresh(self, kind: str) -> None:
        """Re-read one listing from every live downstream, concurrently; a slow or failing one keeps its last listing."""
        attr, fetch_name, field_name, capability = _LISTINGS[kind]

        async def one(ds: Downstream) -> None:
            client = ds.client
            if ds.state != "up" or client is None or not getattr(client.server_capabilities, capability):
                return
            with anyio.move_on_after(min(5.0, ds.mount.timeout_s)):
                try:
                    setattr(ds, attr, await _all_pages(getattr(client, fetch_name), field_name))
                except Exception as exc:  # noqa: BLE001 - a stale listing beats none
                    log_event(log, "listing refresh failed", level=30, prefix=ds.prefix, kind=kind, error=_describe(exc))

        async with anyio.create_task_group() as tg:
            for ds in self.downstreams.values():
                tg.start_soon(one, ds)

    def request_restart(self, prefix: str, reason: str) -> None:
        ds = self.downstreams[prefix]
        if ds.state == "up":
            ds.state = "starting"
            ds.last_error = reason
            log_event(log, "restarting downstream", level=30, prefix=prefix, reason=reason)
        ds.restart.set()

    async def wait_ready(self, prefix: str, timeout_s: float = 10.0) -> bool:
        """Wait until a (re)starting downstream is up or has failed again."""
        ds = self.downstreams[prefix]
        with anyio.move_on_after(timeout_s):
            while ds.state == "starting" or ds.client is None and ds.state == "up":
                await anyio.sleep(0.02)
        return ds.state == "up"

    def _log_forwarder(self, ds: Downstream):  # noqa: ANN202
        async def forward(params: LoggingMessageNotificationParams) -> None:
            if not ds.inflight:
                log_event(log, "downstream log", prefix=ds.prefix, level_name=params.level, data=params.data)
                return
            ctx = ds.inflight[-1]
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore")
                await ctx.session.send_log_message(params.level, params.data, logger=f"{ds.prefix}.{params.logger or 'server'}",
                                                   related_request_id=ctx.request_id)

        return forward

    # --- routing tables ---------------------------------------------------------------------------

    def _visible(self, exposed: str) -> str | None:
        if exposed in self.hide:
            return None
        return self.rename.get(exposed, exposed)

    def tool_table(self) -> dict[str, tuple[Downstream, Any]]:
        """Exposed tool name -> (downstream, downstream tool); first mount wins a clash."""
        # Rebuilt only when a listing changed: this sits on every proxied call's path.
        version = tuple(id(ds.tools) for ds in self.downstreams.values())
        if self._tool_table is not None and self._tool_table[0] == version:
            return self._tool_table[1]
        table: dict[str, tuple[Downstream, Any]] = {}
        # Listings survive a restart, so a call during one gets a clear "restarting" error or waits for it.
        for ds in self.downstreams.values():
            for tool in ds.tools:
                if tool.name in ds.mount.hide:
                    continue
                name = self._visible(ds.exposed(tool.name))
                if name is None or name in self.reserved or name in table:
                    continue
                table[name] = (ds, tool)
        self._tool_table = (version, table)
        return table

    def prompt_table(self) -> dict[str, tuple[Downstream, Any]]:
        table: dict[str, tuple[Downstream, Any]] = {}
        for ds in self.downstreams.values():
            for prompt in ds.prompts:
                name = f"{ds.prefix}_{prompt.name}"
                if name not in table and name not in self.reserved:
                    table[name] = (ds, prompt)
        return table

    def owner_of_uri(self, uri: str) -> Downstream | None:
        """The downstream that lists this URI, or whose template matches it, or that alone uses its scheme."""
        scheme = uri.split("://", 1)[0] if "://" in uri else None
        by_scheme: list[Downstream] = []
        for ds in self.downstreams.values():
            if any(str(r.uri) == uri for r in ds.resources):
                return ds
        for ds in self.downstreams.values():
            if any(_template_regex(t.uri_template).fullmatch(uri) for t in ds.templates):
                return ds
            schemes = {str(r.uri).split("://", 1)[0] for r in ds.resources} | {t.uri_template.split("://", 1)[0] for t in ds.templates}
            if scheme and scheme in schemes:
                by_scheme.append(ds)
        return by_scheme[0] if len(by_scheme) == 1 else None

    # --- forwarding -------------------------------------------------------------------------------

    async def _client(self, ds: Downstream) -> Client:
        if ds.state != "up" or ds.client is None:
            if ds.state == "starting":
                await self.wait_ready(ds.prefix, self.startup_timeout_s)
            if ds.state != "up" or ds.client is None:
                raise DownstreamDown(
                    f"the '{ds.prefix}' server ({ds.mount.source}) is {ds.state}: {ds.last_error or 'not connected'}. "
                    "It is restarted automatically; retry shortly, or check its command/URL in router config."
                )
        return ds.client

    @contextlib.asynccontextmanager
    async def _guard(self, ds: Downstream, what: str, ctx: Any = None):  # noqa: ANN202
        """Turn a crash or a hang into a clear error plus a restart; leave protocol errors as they are."""
        if ctx is not None:
            ds.inflight.append(ctx)
        try:
            with anyio.fail_after(ds.mount.timeout_s):
                yield
        except MCPError as exc:
            if exc.code != CONNECTION_CLOSED:
                raise  # the downstream's own answer, passed through as it is
            self.request_restart(ds.prefix, f"{what}: the connection closed")
            raise DownstreamDown(f"the '{ds.prefix}' server exited during {what} (connection closed); it is being restarted. "
                                 "Retry the call in a moment.") from None
        except TimeoutError:
            self.request_restart(ds.prefix, f"{what} hung for {ds.mount.timeout_s:g} s")
            raise DownstreamDown(f"the '{ds.prefix}' server did not answer {what} within {ds.mount.timeout_s:g} s; "
                                 "it is being restarted. Retry the call, or raise its timeout if the work is long.") from None
        except anyio.get_cancelled_exc_class():
            raise
        except DownstreamDown:
            raise
        except Exception as exc:  # noqa: BLE001
            reason = _describe(exc)
            self.request_restart(ds.prefix, f"{what} failed: {reason}")
            raise DownstreamDown(f"the '{ds.prefix}' server failed during {what} ({reason}); it is being restarted. "
                                 "Retry the call in a moment.") from None
        finally:
            if ctx is not None:
                ds.inflight.remove(ctx)

    async def call_tool(self, exposed: str, arguments: dict[str, Any], ctx: Any = None) -> CallToolResult:
        entry = self.tool_table().get(exposed)
        if entry is None:
            raise MCPError(INVALID_PARAMS, f"unknown tool {exposed!r}")
        ds, tool = entry
        try:
            client = await self._client(ds)
            progress = None
            if ctx is not None:
                # A no-op upstream when the caller asked for no progress; the direct (in-process)
                # transport carries no token to look at, so always ask the downstream for it.
                async def progress(value: float, total: float | None, message: str | None) -> None:
                    await ctx.session.report_progress(value, total, message)
            async with self._guard(ds, f"tools/call {tool.name}", ctx):
                return await client.call_tool(tool.name, arguments, progress_callback=progress, meta=_caller_meta(ds))
        except DownstreamDown as exc:
            return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)

    async def read_resource(self, ds: Downstream, uri: str) -> Any:
        client = await self._client(ds)
        async with self._guard(ds, f"resources/read {uri}"):
            return await client.read_resource(uri, meta=_caller_meta(ds))

    async def get_prompt(self, exposed: str, arguments: dict[str, str] | None) -> Any:
        ds, prompt = self.prompt_table()[exposed]
        client = await self._client(ds)
        async with self._guard(ds, f"prompts/get {prompt.name}"):
            return await client.get_prompt(prompt.name, arguments, meta=_caller_meta(ds))

    def status(self) -> list[dict[str, Any]]:
        table = self.tool_table()
        return [
            {
                "prefix": ds.prefix, "source": ds.mount.source, "state": ds.state, "restarts": ds.restarts,
                "last_error": ds.last_error,
                "tools": sorted(name for name, (owner, _) in table.items() if owner is ds),
                "resources": len(ds.resources), "templates": len(ds.templates), "prompts": len(ds.prompts),
            }
            for ds in self.downstreams.values()
        ]


def _caller_meta(ds: Downstream) -> dict[str, Any] | None:
    """Who is calling, for a suite server mounted in process: it has no token of its own to check, so
    the router passes the verified caller on and the server applies the same scopes and user rule as
    to a direct call. External servers get nothing: they authenticate their own callers."""
    caller = current_caller()
    if caller is None or ds.mount.source != "suite":
        return None
    return {CALLER_META_KEY: caller.as_meta()}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def _all_pages(fetch: Callable[..., Any], attr: str) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(100):
        page = await fetch(cursor=cursor)
        items.extend(getattr(page, attr))
        cursor = page.next_cursor
        if not cursor:
            break
    return items


# kind -> (Downstream attribute, Client method, result field, server capability)
_LISTINGS = {
    "tools": ("tools", "list_tools", "tools", "tools"),
    "resources": ("resources", "list_resources", "resources", "resources"),
    "templates": ("templates", "list_resource_templates", "resource_templates", "resources"),
    "prompts": ("prompts", "list_prompts", "prompts", "prompts"),
}

_TEMPLATE_VAR = re.compile(r"\{[^}]+\}")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = _TEMPLATE_VAR.split(template)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) if len(parts) > 1 else re.escape(template))


# --- the MCP seam ---------------------------------------------------------------------------------


class AggregatingMiddleware:
    """Server middleware: merge downstream listings into the router's, forward what belongs downstream."""

    def __init__(self, get_aggregator: Callable[[Any], Aggregator | None]) -> None:
        self.get_aggregator = get_aggregator

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        agg = self.get_aggregator(ctx)
        if agg is None or ctx.request_id is None:
            return await call_next(ctx)
        method = ctx.method
        params = dict(ctx.params or {})
        if method == "tools/list":
            # Listings are re-read live (in-process mounts answer in well under a millisecond), so pages a
            # server created, or tools it added, show up without a restart.
            await agg.refresh("tools")
            result = await call_next(ctx)
            own = {t["name"] for t in result.get("tools", [])}
            extra = []
            for name, (_, tool) in agg.tool_table().items():
                if name in own:
                    continue
                dumped = tool.model_dump(by_alias=True, mode="json", exclude_none=True)
                dumped["name"] = name
                extra.append(dumped)
            return {**result, "tools": [*result.get("tools", []), *extra]}
        if method == "tools/call" and params.get("name") in agg.tool_table():
            return await agg.call_tool(params["name"], params.get("arguments") or {}, ctx)
        if method == "prompts/list":
            await agg.refresh("prompts")
            result = await call_next(ctx)
            extra = []
            for name, (_, prompt) in agg.prompt_table().items():
                dumped = prompt.model_dump(by_alias=True, mode="json", exclude_none=True)
                dumped["name"] = name
                extra.append(dumped)
            return {**result, "prompts": [*result.get("prompts", []), *extra]}
        if method == "prompts/get" and params.get("name") in agg.prompt_table():
            try:
                return await agg.get_prompt(params["name"], params.get("arguments"))
            except DownstreamDown as exc:
                raise MCPError(INTERNAL_ERROR, str(exc)) from None
        if method == "resources/list":
            await agg.refresh("resources")
            result = await call_next(ctx)
            extra = [r.model_dump(by_alias=True, mode="json", exclude_none=True)
                     for ds in agg.downstreams.values() for r in ds.resources]
            return {**result, "resources": [*result.get("resources", []), *extra]}
        if method == "resources/templates/list":
            await agg.refresh("templates")
            result = await call_next(ctx)
            extra = [t.model_dump(by_alias=True, mode="json", exclude_none=True)
                     for ds in agg.downstreams.values() for t in ds.templates]
            return {**result, "resourceTemplates": [*result.get("resourceTemplates", []), *extra]}
        if method == "resources/read" and "uri" in params:
            owner = agg.owner_of_uri(str(params["uri"]))
            if owner is not None:
                try:
                    return await agg.read_resource(owner, str(params["uri"]))
                except DownstreamDown as exc:
                    raise MCPError(INTERNAL_ERROR, str(exc)) from None
        return await call_next(ctx)
