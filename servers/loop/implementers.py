"""Who makes the next change: the configured agent CLI, or the built-in search. One interface for both.

An implementer gets the worktree, the task file (the target or problem, every earlier attempt with
what it caused, the verifier's or benchmark's last word) and the measured history, and leaves its
change in the worktree. `propose` returns what it did, or None when it has nothing left to try.

The search is a noise-aware coordinate search over the declared values: from the best configuration
so far, try one parameter's neighbouring value at a time, keep going in a direction that paid off,
and stop when every neighbour of the best has been measured. Why this and not a Bayesian search:
tuning budgets here are tens of runs over a few discrete knobs, where a surrogate model has too few
points to be trusted; one knob per attempt also makes each measured result say which knob it was
about, which is exactly the feedback the next move needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .process import CommandResult, run_command
from .store import Attempt
from .targets import Scalar, SearchSpace, read_params, write_params


@dataclass
class AttemptJob:
    worktree: Path
    task_file: Path
    history: list[Attempt]  # oldest first; for a target, attempt 0 is the baseline
    best: Attempt | None  # the best valid attempt so far
    log_path: Path
    timeout_s: float
    env: dict[str, str]


@dataclass
class Proposal:
    summary: str  # what the implementer says it did
    config: dict[str, Any] | None = None  # the parameters it set, for a search
    command: CommandResult | None = None  # the agent's run, when there was one


class Implementer(Protocol):
    name: str

    def propose(self, job: AttemptJob) -> Proposal | None: ...


class AgentImplementer:
    """The configured agent CLI, run in the worktree with the task file; it ends on exit or at a budget."""

    name = "agent"

    def __init__(self, command: list[str], max_output_bytes: int) -> None:
        self.command = command
        self.max_output_bytes = max_output_bytes

    def propose(self, job: AttemptJob) -> Proposal | None:
        argv = [part.replace("{task_file}", str(job.task_file)).replace("{worktree}", str(job.worktree)) for part in self.command]
        result = run_command(argv, cwd=job.worktree, log_path=job.log_path, timeout_s=job.timeout_s,
                             max_output_bytes=self.max_output_bytes, env={"HYDRABRAIN_LOOP_TASK_FILE": str(job.task_file), **job.env})
        return Proposal(summary=result.describe(), command=result)


class SearchImplementer:
    """Coordinate search over a target's declared parameter values, driven by the measured history."""

    name = "search"

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def defaults(self, worktree: Path) -> dict[str, Scalar]:
        return read_params(worktree / self.space.file, list(self.space.params))

    def propose(self, job: AttemptJob) -> Proposal | None:
        best = job.best.config if job.best and job.best.config else self.defaults(job.worktree)
        tried = [a.config for a in job.history if a.config is not None]
        for name, step in self._moves(job.history):
            candidate = self._neighbour(best, name, step)
            if candidate is not None and candidate not in tried:
                write_params(job.worktree / self.space.file, {name: candidate[name]})
                return Proposal(summary=f"{name}: {best[name]!r} → {candidate[name]!r}", config=candidate)
        return None

    def _moves(self, history: list[Attempt]) -> list[tuple[str, int]]:
        """Which (parameter, step) to try, best bets first: repeat the move that last paid off, then the others."""
        names = list(self.space.params)
        last_gain: tuple[str, int] | None = None
        best_config: dict[str, Any] | None = None
        for attempt in history:
            if attempt.config is None:
                continue
            if attempt.verdict == "gain" and best_config is not None:
                moved = [n for n in names if attempt.config.get(n) != best_config.get(n)]
                if moved:
                    last_gain = (moved[0], self._direction(moved[0], best_config[moved[0]], attempt.config[moved[0]]))
            if attempt.verdict in ("baseline", "gain"):
                best_config = attempt.config
        moves: list[tuple[str, int]] = []
        if last_gain is not None:
            moves.append(last_gain)
            start = names.index(last_gain[0])
            names = names[start:] + names[:start]
        for name in names:
            for step in (1, -1):
                if (name, step) not in moves:
                    moves.append((name, step))
        return moves

    def _direction(self, name: str, old: Any, new: Any) -> int:
        values = self.space.params[name]
        if old in values and new in values:
            return 1 if values.index(new) > values.index(old) else -1
        return 1 if isinstance(new, int | float) and isinstance(old, int | float) and new > old else -1

    def _neighbour(self, config: dict[str, Any], name: str, step: int) -> dict[str, Any] | None:
        values = self.space.params[name]
        current = config[name]
        if current in values:
            index = values.index(current) + step
            if not 0 <= index < len(values):
                return None
            return {**config, name: values[index]}
        # A default that is not among the declared values: step to the nearest declared value on that side.
        if isinstance(current, int | float):
            side = [v for v in values if isinstance(v, int | float) and (v > current if step > 0 else v < current)]
            if not side:
                return None
            return {**config, name: min(side, key=lambda v: abs(v - current))}
        return {**config, name: values[0]} if step > 0 else None
