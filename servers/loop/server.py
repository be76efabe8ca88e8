"""The loop server's MCP surface: thin tools over `core.Loop`, state from a typed lifespan.

Work that runs git or the repo's tests happens in a worker thread, so one long cycle never stalls
the server's other requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from pydantic import BaseModel, Field

from hydrabrain.shared.auth import ToolScopes, current_caller
from hydrabrain.shared.config import Settings
from hydrabrain.shared.serving import new_server

from .core import AttemptsResult, CycleReport, DiscoverResult, Handoff, Loop, LoopError, StatusResult, VerifyResult
from .optimize import TargetStatus
from .process import CommandNotFound
from .schedule import Scheduler
from .store import Finding, Schedule
from .targets import TargetError
from .worktrees import GitError, repo_root

INSTRUCTIONS = """Runs the improvement loop over a git repository the user names.
discover(repo) lists work worth doing (failing tests, open issues, TODO/FIXME lines and untested changes from recent
commits), each with a stable finding_id. handoff(finding_id) gives that finding its own git worktree and branch with a
task file; make the change there, not in the main checkout. verify(finding_id) is an independent check that assumes the
change is broken: it runs the repo's tests in the worktree, checks the diff stays in scope, and asks a skeptical
reviewer when an LLM provider is configured. PASS commits the change on the finding's branch and removes the worktree;
FAIL keeps the worktree for another try and says what the verifier saw (also in the task file); attempts(id) lists
every try. run_once(repo) does a whole cycle; schedule(repo, ...) repeats cycles. optimize(repo, target) improves a
measured target (a benchmark metric) by attempts that must pass the tests and beat the benchmark's noise."""

T = TypeVar("T")
RepoArg = Annotated[str, Field(description="Path of the git repository (its top folder or any folder inside it)")]
FindingArg = Annotated[str, Field(description="A finding_id returned by discover or status, like 'f-1a2b3c4d5e6f'")]


@dataclass
class LoopState:
    loop: Loop
    scheduler: Scheduler


class ScheduleResult(BaseModel):
    repo: str
    active: bool = Field(description="False when the schedule was removed")
    schedule: Schedule | None = None
    next_in_s: float | None = Field(None, description="Seconds until the next cycle")


class FindingDetail(BaseModel):
    finding: Finding
    verdicts: list[dict[str, Any]]


def _state(ctx: Context) -> LoopState:
    return ctx.request_context.lifespan_context


async def _off_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking loop work in a worker thread; anticipated failures reach the caller as readable errors."""
    try:
        # Abandoned on cancel: a caller's timeout (the router's call_timeout_s) must not wait for the thread.
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except (LoopError, GitError, CommandNotFound, TargetError, OSError) as exc:
        # The SDK hides a plain exception's text from the model; these messages are written for it.
        raise ToolError(str(exc)) from exc


def build_server(settings: Settings) -> MCPServer[Any]:
    @asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[LoopState]:
        loop = Loop(settings)
        async with anyio.create_task_group() as tg:
            scheduler = Scheduler(loop, tg)
            scheduler.start()
            try:
                yield LoopState(loop, scheduler)
            finally:
                scheduler.shutdown()
                tg.cancel_scope.cancel()

    scopes = ToolScopes("loop", resources="loop:run")
    server = new_server("loop", instructions=INSTRUCTIONS, lifespan=lifespan, settings=settings, scopes=scopes)

    def allowed_roots() -> list[Path]:
        if settings.loop.allowed_repos is not None:
            return [Path(p).expanduser().resolve() for p in settings.loop.allowed_repos]
        # Over HTTP a caller could name any repository on this machine, and the loop runs that repo's
        # own test command (its conftest.py included): nothing is allowed until the operator says so.
        over_http = getattr(server, "hydrabrain_transport", "stdio") != "stdio" or current_caller() is not None
        return [] if over_http else [Path.cwd().resolve()]

    def confine(repo: str) -> None:
        try:
            root = repo_root(repo)
        except (LoopError, GitError) as exc:
            raise ToolError(str(exc)) from exc
        roots = allowed_roots()
        if not any(root == r or r in root.parents for r in roots):
            where = ", ".join(str(r) for r in roots) or "none"
            raise ToolError(f"the loop may not run commands in {root}: it is outside loop.allowed_repos (now: {where}). "
                            "Add it, or a folder above it, to allowed_repos under [loop] in hydrabrain.toml")

    def confine_finding(ctx: Context, finding_id: str) -> None:
        found = _state(ctx).loop.store.finding(finding_id)
        if found is not None:  # an unknown id gets the loop's own error
            confine(found.repo)

    @server.tool()
    @scopes.need("loop:run")
    async def discover(repo: RepoArg, ctx: Context) -> DiscoverResult:
        """Find work in a repo (failing tests, issues, TODO/FIXME and untested changes in recent commits), ranked, deduplicated across runs."""
        confine(repo)
        return await _off_thread(_state(ctx).loop.discover, repo)

    @server.tool()
    @scopes.need("loop:run")
    async def handoff(finding_id: FindingArg, ctx: Context) -> Handoff:
        """Give a finding its own git worktree and branch with a task file; returns where to work. Idempotent."""
        confine_finding(ctx, finding_id)
        return await _off_thread(_state(ctx).loop.handoff, finding_id)

    @server.tool()
    @scopes.need("loop:run")
    async def verify(finding_id: FindingArg, ctx: Context) -> VerifyResult:
        """Independently check the change in a finding's worktree (tests, scope, skeptical review): PASS or FAIL with reasons."""
        confine_finding(ctx, finding_id)
        return await _off_thread(_state(ctx).loop.verify, finding_id)

    @server.tool()
    @scopes.need("loop:run")
    async def attempts(
        finding_id: Annotated[str, Field(description="A finding_id, or an optimization_id from optimize or status")], ctx: Context
    ) -> AttemptsResult:
        """Every attempt at a finding or optimisation target: what changed, its commit, the verdict or measurement, the feedback."""
        return await _off_thread(_state(ctx).loop.attempts, finding_id)

    @server.tool()
    @scopes.need("loop:run")
    async def close(
        finding_id: FindingArg,
        ctx: Context,
        reason: Annotated[str, Field(description="Why the finding is closed without a verified fix (e.g. 'won't fix', 'duplicate')")] = "",
    ) -> Finding:
        """Close a finding without a fix and remove its worktree; its branch stays."""
        confine_finding(ctx, finding_id)
        return await _off_thread(_state(ctx).loop.close, finding_id, reason)

    @server.tool()
    @scopes.need("loop:run")
    async def run_once(repo: RepoArg, ctx: Context) -> CycleReport:
        """Run one full cycle on a repo now: discover, hand off, implement (if configured), verify; resumes an interrupted cycle."""
        confine(repo)
        caller = current_caller()
        return await _off_thread(_state(ctx).loop.run_once, repo, caller.user if caller else None)

    @server.tool()
    @scopes.need("loop:run")
    async def optimize(
        repo: RepoArg,
        target: Annotated[str, Field(description="A target name from [loop.targets] in the repo's hydrabrain.toml, or a target .toml file's path")],
        ctx: Context,
        implementer: Annotated[Literal["auto", "search", "agent"], Field(
            description="search: the built-in search over the target's parameters; agent: loop.implementer_command; auto: search when the target declares one")] = "auto",
        max_attempts: Annotated[int | None, Field(ge=1, description="Measure at most this many attempts in this call; the next call resumes")] = None,
        fresh: Annotated[bool, Field(description="Start over from HEAD instead of resuming or reporting the last optimisation")] = False,
    ) -> TargetStatus:
        """Improve a benchmark metric by measured attempts (tests must pass, gains must beat the noise); stops when gains stop; resumable."""
        confine(repo)
        return await _off_thread(_state(ctx).loop.optimize, repo, target, implementer, max_attempts, fresh)

    @server.tool()
    @scopes.need("loop:run")
    async def schedule(
        repo: RepoArg,
        ctx: Context,
        every_seconds: Annotated[float | None, Field(description="Run a cycle every this many seconds (at least 1)")] = None,
        cron: Annotated[str | None, Field(description="Or a five-field cron expression, e.g. '0 * * * *' for hourly (UTC)")] = None,
    ) -> ScheduleResult:
        """Run cycles on a repo inside the server, every N seconds or on a cron expression; give neither to stop."""
        from .schedule import next_delay

        state = _state(ctx)
        confine(repo)
        try:
            # Not in a worker thread: the scheduler starts tasks in the server's own task group.
            made = state.scheduler.set(repo, every_seconds, cron)
        except (LoopError, GitError) as exc:
            raise ToolError(str(exc)) from exc
        if made is None:
            return ScheduleResult(repo=repo, active=False)
        return ScheduleResult(repo=made.repo, active=True, schedule=made, next_in_s=round(next_delay(made), 3))

    @server.tool()
    @scopes.need("loop:run")
    async def status(
        ctx: Context,
        repo: Annotated[str | None, Field(description="Limit to this repository; omit for every repo the loop knows")] = None,
    ) -> StatusResult:
        """Findings by status, the best open ones, recent cycles, schedules, and each optimisation target's best so far."""
        if repo is not None:
            confine(repo)
        return await _off_thread(_state(ctx).loop.status, repo)

    @server.resource("loop://findings/{finding_id}", mime_type="application/json")
    def finding_resource(finding_id: str, ctx: Context) -> str:
        """A finding with its full detail and every verdict given on it."""
        loop = _state(ctx).loop
        found = loop.store.finding(finding_id)
        if found is None:
            raise ResourceNotFoundError(f"no finding {finding_id!r}; discover(repo) lists them")
        verdicts = [v.model_dump() for v in loop.store.verdicts(finding_id)]
        return FindingDetail(finding=found, verdicts=verdicts).model_dump_json(indent=2)

    @server.resource("loop://runs/{run_id}", mime_type="application/json")
    def run_resource(run_id: str, ctx: Context) -> str:
        """One cycle: its plan, every step with its outcome, and its summary."""
        run = _state(ctx).loop.store.run(run_id)
        if run is None:
            raise ResourceNotFoundError(f"no run {run_id!r}; status() lists recent runs")
        return json.dumps(run.model_dump(), indent=2)

    return server
