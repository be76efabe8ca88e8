"""Cycles on a timer inside the server process: every N seconds or on a cron expression.

Schedules are stored, so a restarted server picks them up again. A tick that finds a cycle still
running on the repo (the lock is taken) skips rather than queueing a second one behind it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import anyio
from anyio.abc import TaskGroup
from croniter import croniter

from hydrabrain.shared.telemetry import get_logger, log_event

from .core import CycleBusy, Loop, LoopError
from .process import kill_running
from .store import Schedule, now
from .worktrees import repo_root

log = get_logger("loop.schedule")


def validate(every_seconds: float | None, cron: str | None) -> None:
    if every_seconds is not None and cron is not None:
        raise LoopError("give every_seconds or cron, not both")
    if every_seconds is not None and every_seconds < 1:
        raise LoopError(f"every_seconds must be at least 1, got {every_seconds}")
    if cron is not None and not croniter.is_valid(cron):
        raise LoopError(f"{cron!r} is not a cron expression; use five fields like '*/15 * * * *' (every 15 minutes)")


def next_delay(schedule: Schedule, at: float | None = None) -> float:
    at = time.time() if at is None else at
    if schedule.cron:
        following = croniter(schedule.cron, datetime.fromtimestamp(at, timezone.utc)).get_next(float)
        return max(0.0, following - at)
    return float(schedule.every_seconds or 0)


class Scheduler:
    """One task per scheduled repo in the server's task group; `set` replaces, `drop` cancels."""

    def __init__(self, loop: Loop, tg: TaskGroup) -> None:
        self.loop = loop
        self.tg = tg
        self.scopes: dict[str, anyio.CancelScope] = {}

    def start(self) -> None:
        for schedule in self.loop.store.schedules():
            self._spawn(schedule)

    def set(self, repo: str, every_seconds: float | None, cron: str | None) -> Schedule | None:
        """Schedule cycles on `repo`; with neither every_seconds nor cron, stop its schedule."""
        root = str(repo_root(repo))
        validate(every_seconds, cron)
        self._cancel(root)
        if every_seconds is None and cron is None:
            self.loop.store.drop_schedule(root)
            return None
        schedule = Schedule(repo=root, every_seconds=every_seconds, cron=cron, created=now())
        self.loop.store.set_schedule(schedule)
        self._spawn(schedule)
        return schedule

    def _cancel(self, repo: str) -> None:
        scope = self.scopes.pop(repo, None)
        if scope is not None:
            scope.cancel()

    def _spawn(self, schedule: Schedule) -> None:
        scope = anyio.CancelScope()
        self.scopes[schedule.repo] = scope
        self.tg.start_soon(self._run, schedule, scope)

    async def _run(self, schedule: Schedule, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(next_delay(schedule))
                try:
                    report = await anyio.to_thread.run_sync(self.loop.run_once, schedule.repo, abandon_on_cancel=True)
                except CycleBusy:
                    log_event(log, "tick skipped: a cycle is still running", repo=schedule.repo)
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad cycle must not take the server down
                    log_event(log, "scheduled cycle failed", repo=schedule.repo, error=f"{type(exc).__name__}: {exc}")
                    continue
                self.loop.store.schedule_ran(schedule.repo, report.run_id)

    def shutdown(self) -> None:
        self.loop.stop.set()
        for repo in list(self.scopes):
            self._cancel(repo)
        # A cycle abandoned mid-command would otherwise leave its test run behind; the run stays
        # 'running' in the store and the next cycle resumes it.
        kill_running()
