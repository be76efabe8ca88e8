"""Optimisation mode: act (propose a change), observe (test it, benchmark it with repeats), learn (feed every
measured result into the next move), repeat until gains stop.

The optimisation lives on its own branch `loop/<optimization_id>` in its own worktree. Attempt 0 is the
base commit, measured like any other, so the first change is compared against a measured default and
not against a number someone remembers. Every attempt is a commit kept under
`refs/loop/<id>/attempt-<n>`; the branch itself always points at the best valid attempt, which is what
the next attempt starts from. All state is in the store after each attempt, so a process killed
mid-way loses at most the attempt it was measuring; calling `optimize` again resumes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from hydrabrain.shared.telemetry import get_logger, log_event

from . import feedback
from .discover import detect_test_command
from .implementers import AgentImplementer, AttemptJob, Implementer, SearchImplementer
from .process import CommandNotFound, run_command
from .store import Attempt, Measurement, Optimization, now
from .targets import Target, TargetError, compare, load_target, measure, read_metric
from .verify import in_globs
from .worktrees import (
    TASK_FILE,
    atomic_write,
    attempt_ref,
    changed_files,
    commit_all,
    diffstat,
    ensure_worktree,
    exclude_task_file,
    git,
    head,
    remove_worktree,
    repo_slug,
    require_clean,
    set_ref,
)

if TYPE_CHECKING:
    from .core import Loop

log = get_logger("loop.optimize")


class TargetStatus(BaseModel):
    optimization_id: str
    target: str
    metric: str
    direction: str
    status: str = Field(description="running (resumable), done, or failed")
    stopped: str | None = Field(None, description="Why it stopped")
    attempts: int = Field(description="Attempts measured, not counting the baseline")
    baseline: Measurement | None = None
    best: Attempt | None = Field(None, description="The best valid attempt so far (number 0 is the unchanged baseline)")
    gain: float | None = Field(None, description="The best's improvement over the baseline, as a fraction of the baseline (positive is better)")
    branch: str = Field(description="Points at the best attempt; merge it to keep the change")
    implementer: str | None = None


def optimization_id(root: Path, target: str) -> str:
    return "o-" + hashlib.sha256(f"{root}\0{target}".encode()).hexdigest()[:12]


def target_status(opt: Optimization, attempts: list[Attempt]) -> TargetStatus:
    baseline = next((a for a in attempts if a.number == 0), None)
    best = next((a for a in attempts if a.number == opt.best_number), None)
    gain = None
    if baseline and best and baseline.measurement and best.measurement and baseline.measurement.mean:
        sign = 1.0 if opt.spec.get("direction") == "higher" else -1.0
        gain = round(sign * (best.measurement.mean - baseline.measurement.mean) / abs(baseline.measurement.mean), 6)
    return TargetStatus(
        optimization_id=opt.optimization_id, target=opt.target, metric=str(opt.spec.get("metric")),
        direction=str(opt.spec.get("direction")), status=opt.status, stopped=opt.stopped,
        attempts=len([a for a in attempts if a.number > 0]), baseline=baseline.measurement if baseline else None,
        best=best, gain=gain, branch=opt.branch, implementer=opt.spec.get("_implementer"),
    )


class Optimizer:
    """Runs one target's optimisation for a `Loop` (its store, settings, memory and worktree root)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.store = loop.store
        self.cfg = loop.cfg

    def run(self, root: Path, target_name: str, implementer: str = "auto", max_new: int | None = None,
            fresh: bool = False) -> TargetStatus:
        target = load_target(root, target_name, self.cfg.targets)
        opt_id = optimization_id(root, target.name)
        opt = self.store.optimization(opt_id)
        if opt is not None and opt.status != "running" and not fresh:
            return target_status(opt, self.store.attempts(opt_id))  # finished: report it; fresh=True starts over
        worker = self._choose(target, implementer)
        spec = {**target.model_dump(), "_implementer": worker.name}
        if opt is not None and opt.status == "running" and not fresh:
            if {k: v for k, v in opt.spec.items() if k != "_implementer"} != target.model_dump():
                raise TargetError(f"target {target.name!r} changed since its optimisation started; pass fresh=True to start "
                                  "over from HEAD, or restore the target as it was to resume")
            if opt.spec.get("_implementer") != worker.name:
                opt = self._save(opt, spec=spec)  # a resumed run may hand over to the other implementer
        if opt is None or fresh:
            opt = self._start(root, target, opt_id, spec)
        return self._continue(root, target, opt, worker, max_new)

    def _choose(self, target: Target, implementer: str) -> Implementer:
        if implementer not in ("auto", "search", "agent"):
            raise TargetError(f"implementer must be auto, search or agent, not {implementer!r}")
        if implementer == "agent" or (implementer == "auto" and target.search is None):
            if not self.cfg.implementer_command:
                raise TargetError(f"target {target.name!r} has no search space, so an agent must make the changes: set "
                                  "loop.implementer_command, or give the target a [search] of parameters")
            return AgentImplementer(list(self.cfg.implementer_command), self.cfg.implementer_max_output_bytes)
        if target.search is None:
            raise TargetError(f"target {target.name!r} declares no search space (search.file and search.params)")
        return SearchImplementer(target.search)

    def _start(self, root: Path, target: Target, opt_id: str, spec: dict[str, Any]) -> Optimization:
        require_clean(root)
        base = head(root)
        path = self.loop.worktree_root / repo_slug(root) / opt_id
        branch = f"loop/{opt_id}"
        old = self.store.optimization(opt_id)
        if old is not None and old.worktree:
            remove_worktree(root, Path(old.worktree))
        if old is not None:
            git(["branch", "-D", branch], root, check=False)  # the old attempts stay under refs/loop/<id>/
        self.store.drop_attempts(opt_id)
        ensure_worktree(root, path, branch, base)
        exclude_task_file(root)
        stamp = now()
        opt = Optimization(optimization_id=opt_id, repo=str(root), target=target.name, spec=spec, status="running",
                           branch=branch, worktree=str(path.resolve()), base_commit=base, started=stamp, updated=stamp)
        log_event(log, "optimise start", target=target.name, id=opt_id, base=base[:10])
        return self.store.save_optimization(opt)

    # --- the loop ------------------------------------------------------------------------------

    def _continue(self, root: Path, target: Target, opt: Optimization, worker: Implementer, max_new: int | None) -> TargetStatus:
        path = Path(opt.worktree) if opt.worktree else self.loop.worktree_root / repo_slug(root) / opt.optimization_id
        worktree = ensure_worktree(root, path, opt.branch, opt.base_commit).path
        if opt.worktree != str(worktree):
            opt = self._save(opt, worktree=str(worktree))
        log_dir = self.loop._log_dir(f"optimize-{opt.optimization_id}")
        done_now = 0
        while True:
            history = self.store.attempts(opt.optimization_id)
            if not any(a.number == 0 for a in history):
                self._reset(worktree, opt.base_commit)
                baseline = self._measure(root, target, opt, worktree, 0, None, log_dir, worker)
                if baseline.verdict != "baseline":
                    return self._finish(root, opt, worktree, "failed", "the base commit itself is not valid: "
                                        + "; ".join(baseline.reasons[:2]) + " — fix that first")
                opt = self._save(opt, best_number=0)
                continue
            stopped = self._stop_reason(target, history)
            if stopped:
                return self._finish(root, opt, worktree, "done", stopped)
            if self.loop.stop.is_set() or (max_new is not None and done_now >= max_new):
                return target_status(self._save(opt), history)  # still running: the next call resumes
            best = next(a for a in history if a.number == opt.best_number)
            self._reset(worktree, best.commit_sha or opt.base_commit)
            number = history[-1].number + 1
            task = worktree / TASK_FILE
            atomic_write(task, self._task_text(target, opt, history))
            job = AttemptJob(worktree=worktree, task_file=task, history=history, best=best,
                             log_path=log_dir / f"implement-{number}.log", timeout_s=self.cfg.implementer_timeout_s,
                             env={"HYDRABRAIN_LOOP_OPTIMIZATION": opt.optimization_id, "HYDRABRAIN_LOOP_ATTEMPT": str(number)})
            try:
                proposal = worker.propose(job)
            except CommandNotFound as exc:
                return self._finish(root, opt, worktree, "failed", str(exc))
            if proposal is None:
                return self._finish(root, opt, worktree, "done", "search space exhausted: every neighbour of the best "
                                                                 "configuration has been measured (a local optimum)")
            attempt = self._measure(root, target, opt, worktree, number, proposal.config, log_dir, worker,
                                    said=proposal.summary, best=best)
            done_now += 1
            if attempt.verdict == "gain":
                opt = self._save(opt, best_number=number)
            # Whoever looks next (the implementer, or a person in the worktree) reads what this attempt measured.
            atomic_write(task, self._task_text(target, opt, self.store.attempts(opt.optimization_id)))

    def _stop_reason(self, target: Target, history: list[Attempt]) -> str | None:
        tried = [a for a in history if a.number > 0]
        streak = 0
        for a in reversed(tried):
            if a.verdict == "gain":
                break
            streak += 1
        if streak >= target.patience:
            return f"no significant gain in {streak} attempt{'s' if streak != 1 else ''} in a row (patience {target.patience})"
        if len(tried) >= target.max_attempts:
            return f"attempt budget spent ({target.max_attempts} attempts)"
        return None

    def _measure(self, root: Path, target: Target, opt: Optimization, worktree: Path, number: int,
                 config: dict[str, Any] | None, log_dir: Path, worker: Implementer, said: str = "",
                 best: Attempt | None = None) -> Attempt:
        """Test the worktree (valid?), benchmark it `repeats` times, compare with the best, record the attempt."""
        changed = changed_files(worktree, opt.base_commit)
        reasons: list[str] = []
        outside = [p for p in changed if not in_globs(p, target.scope)]
        if outside:
            reasons.append(f"changes outside the target's scope ({', '.join(target.scope)}): {', '.join(outside[:10])}")
        if number > 0 and best is not None and not changed_files(worktree, best.commit_sha or opt.base_commit):
            reasons.append("no change against the best attempt: nothing to measure")
        test = target.test or detect_test_command(worktree, self.cfg, root)
        if not reasons and test:
            ran = run_command(test, cwd=worktree, log_path=log_dir / f"test-{number}.log", timeout_s=target.timeout_s)
            if not ran.ok:
                reasons.append(f"tests fail: {ran.describe(' '.join(test))}; last output: {ran.tail(600).strip()[-600:]}")
        measurement = None
        if not reasons:
            values = []
            for repeat in range(target.repeats):
                ran = run_command(target.benchmark, cwd=worktree, log_path=log_dir / f"bench-{number}-{repeat}.log",
                                  timeout_s=target.timeout_s,
                                  env={"HYDRABRAIN_LOOP_ATTEMPT": str(number), "HYDRABRAIN_LOOP_REPEAT": str(repeat)})
                value = read_metric(ran.tail(20_000), target.metric) if ran.ok else None
                if value is None:
                    why = ran.describe(" ".join(target.benchmark)) if not ran.ok else f"it printed no `{target.metric}` value"
                    reasons.append(f"benchmark failed on repeat {repeat + 1}: {why}; last output: {ran.tail(400).strip()}")
                    break
                values.append(value)
            if not reasons:
                measurement = measure(values)
        if measurement is None:
            verdict = "invalid"
        elif number == 0 or best is None or best.measurement is None:
            verdict = "baseline"
            reasons.append(f"baseline {target.metric} {measurement.mean:.6g} ± {measurement.stdev:.2g} over {measurement.n} runs")
        else:
            verdict, delta, threshold = compare(measurement, best.measurement, target.direction, target.min_gain)
            better = "better" if delta > 0 else "worse"
            reasons.append(f"{verdict}: {abs(delta):.4g} {better} than attempt {best.number} "
                           f"({best.measurement.mean:.6g}); the noise allows ±{threshold:.3g}")
        if number == 0 and isinstance(worker, SearchImplementer):
            config = worker.defaults(worktree)
        commit = None
        summary = said or "unchanged base"
        if number > 0 and changed:
            commit = commit_all(worktree, f"loop: attempt {number} on target {target.name} ({verdict})\n\n{said}")
            set_ref(worktree, attempt_ref(opt.optimization_id, number), commit)
            summary = said if isinstance(worker, SearchImplementer) else (diffstat(worktree, best.commit_sha or opt.base_commit, commit)
                                                                          if best else said) or said
        attempt = Attempt(owner_id=opt.optimization_id, number=number, verdict=verdict, commit_sha=commit or (opt.base_commit if number == 0 else None),
                          summary=summary, changed=changed, reasons=reasons, measurement=measurement, config=config, created=now())
        attempt.feedback = self._feedback(target, attempt)
        self.store.add_attempt(attempt)
        log_event(log, "optimise attempt", target=target.name, number=number, verdict=verdict,
                  mean=measurement.mean if measurement else None)
        self.loop.memory.record_attempt(opt.repo, "optimization", f"{target.name}: {target.metric} ({target.direction} is better)", attempt)
        return attempt

    def _feedback(self, target: Target, attempt: Attempt) -> str:
        lines = [f"## What the last attempt measured (attempt {attempt.number}: {attempt.verdict})", ""]
        if attempt.measurement is not None:
            m = attempt.measurement
            lines.append(f"- {target.metric} per run: {', '.join(f'{v:.6g}' for v in m.values)} → {m.mean:.6g} ± {m.stdev:.2g}")
        lines += [f"- {r}" for r in attempt.reasons]
        return "\n".join(lines) + "\n"

    def _task_text(self, target: Target, opt: Optimization, history: list[Attempt]) -> str:
        lessons = self.loop.memory.lessons(opt.repo, "optimization", f"{target.name}: {target.metric} ({target.direction} is better)") \
            if len(history) == 1 else []
        lines = [feedback.lessons_section(lessons)] if lessons else []
        lines += [
            f"# Optimise `{target.metric}` ({target.direction} is better): target {target.name}",
            "",
            f"- the benchmark: `{' '.join(target.benchmark)}`, run {target.repeats} times per attempt; a change counts only "
            "when it beats the best attempt by more than the noise those runs show",
            f"- validity: `{' '.join(target.test) if target.test else 'the repo test command'}` must pass",
            f"- you may change: {', '.join(f'`{g}`' for g in target.scope)}",
            f"- this worktree holds the best attempt so far; the loop stops after {target.patience} attempts in a row "
            f"without a significant gain, or after {target.max_attempts}",
        ]
        if target.search is not None:
            space = "; ".join(f"`{k}` in {v}" for k, v in target.search.params.items())
            lines.append(f"- parameters in `{target.search.file}`: {space}")
        lines.append("")
        last = history[-1]
        lines += [last.feedback, feedback.history(history, limit=10)]
        return "\n".join(lines)

    # --- plumbing ------------------------------------------------------------------------------

    def _reset(self, worktree: Path, commit: str) -> None:
        """Put the worktree (and its branch) back on `commit`; other attempts stay reachable through their refs."""
        git(["reset", "-q", "--hard", commit], worktree)
        git(["clean", "-q", "-fd"], worktree)  # ignored files (the task file) stay

    def _save(self, opt: Optimization, **fields: Any) -> Optimization:
        opt = opt.model_copy(update={**fields, "updated": now()})
        return self.store.save_optimization(opt)

    def _finish(self, root: Path, opt: Optimization, worktree: Path, status: str, why: str) -> TargetStatus:
        history = self.store.attempts(opt.optimization_id)
        best = next((a for a in history if a.number == opt.best_number), None)
        if best is not None and best.commit_sha:
            self._reset(worktree, best.commit_sha)  # the branch ends on the best attempt
        remove_worktree(root, worktree)
        opt = self._save(opt, status=status, stopped=why, worktree=None)
        log_event(log, "optimise done", target=opt.target, status=status, stopped=why, best=opt.best_number)
        return target_status(opt, history)

