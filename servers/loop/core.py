"""The loop: discover → hand off to a worktree → verify with a skeptic → persist, one cycle at a time.

`Loop` holds no state of its own beyond paths: everything lives in the SQLite store and in git, so
a process killed mid-cycle loses nothing and the next cycle resumes the interrupted one. Every
step is idempotent: a worktree that exists is reused, a verdict on an unchanged worktree is reused,
a step recorded as done in the interrupted run is skipped.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from hydrabrain.shared.config import Settings
from hydrabrain.shared.telemetry import get_logger, log_event

from . import discover as sources
from . import feedback
from .implementers import AgentImplementer, AttemptJob
from .memory_link import MemoryLink
from .optimize import Optimizer, TargetStatus, optimization_id, target_status
from .process import CommandNotFound, pass_env
from .store import ACTIVE, Attempt, Finding, Run, Schedule, Store, Verdict, now
from .targets import load_target
from .verify import Check, verify_worktree
from .worktrees import (
    TASK_FILE,
    DirtyWorktree,
    GitError,
    WorktreeMissing,
    atomic_write,
    attempt_ref,
    branch_exists,
    branch_for,
    changed_files,
    commit_all,
    diffstat,
    ensure_worktree,
    exclude_task_file,
    fingerprint,
    git,
    head,
    is_ancestor,
    remove_worktree,
    repo_root,
    repo_slug,
    require_clean,
    set_ref,
)

log = get_logger("loop")


class LoopError(RuntimeError):
    """A request the loop cannot carry out; the message says why and what to do."""


class CycleBusy(LoopError):
    pass


class UnknownFinding(LoopError):
    pass


# --- results --------------------------------------------------------------------------------


class SourceNote(BaseModel):
    source: str
    complete: bool = Field(description="False when the source could not be read fully (its absences prove nothing)")
    note: str


class DiscoverResult(BaseModel):
    repo: str
    findings: list[Finding] = Field(description="Active findings, best first")
    new: list[str] = Field(default_factory=list, description="Finding ids seen for the first time")
    gone: list[str] = Field(default_factory=list, description="Finding ids that no longer reproduce")
    sources: list[SourceNote] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    test_command_s: float = Field(0.0, description="Seconds the repo's test command took")


class Handoff(BaseModel):
    finding_id: str
    path: str = Field(description="The finding's own git worktree")
    branch: str
    task_file: str = Field(description="Markdown description of the task inside the worktree (ignored by git)")
    base_commit: str
    created: bool = Field(description="False when the worktree already existed")
    recreated: bool = Field(False, description="True when the worktree had been deleted by hand and was put back")


class VerifyResult(BaseModel):
    finding_id: str
    verdict: str = Field(description="PASS or FAIL")
    reasons: list[str]
    cached: bool = Field(False, description="True when the worktree had not changed since this verdict was given")
    branch: str | None = None
    worktree: str | None = Field(None, description="Kept on FAIL for the next attempt; removed on PASS")
    result_commit: str | None = Field(None, description="On PASS, the commit on `branch` holding the change")
    test_log: str | None = None
    attempt: int | None = Field(None, description="Which attempt this verdict is about (each is a commit on `branch`)")
    attempts_left: int | None = Field(None, description="Attempts the budget (loop.max_attempts) still allows; 0 closes the finding")
    feedback: str | None = Field(None, description="On FAIL: what the verifier saw (failing tests with their assertion lines, "
                                 "scope violations, reviewer objections) and the earlier attempts; also written to the task file")


class AttemptsResult(BaseModel):
    id: str = Field(description="The finding_id or optimization_id")
    kind: str = Field(description="finding or optimization")
    status: str
    attempts: list[Attempt] = Field(description="Oldest first; each commit is also kept under refs/loop/<id>/attempt-<n>")
    best: int | None = Field(None, description="Optimisations: the number of the best valid attempt (0: the baseline)")


class CycleReport(BaseModel):
    run_id: str
    repo: str
    status: str
    resumed: bool = Field(False, description="True when this cycle continued one a killed process left unfinished")
    discovered: int = 0
    plan: list[str] = Field(default_factory=list)
    verdicts: dict[str, str] = Field(default_factory=dict, description="finding id -> PASS / FAIL / why not verified")
    stopped: str | None = Field(None, description="Which budget ended the cycle early, if any")
    overhead_s: float = Field(0.0, description="Cycle time not spent inside the repo's commands")
    command_s: float = Field(0.0, description="Time spent inside the repo's commands (tests, implementer)")
    by: str | None = Field(None, description="Who asked for the cycle (the token's user over HTTP); None for stdio and schedules")


class RepoStatus(BaseModel):
    repo: str
    counts: dict[str, int]
    cycle_running: bool
    top: list[Finding] = Field(description="The best-ranked active findings")
    runs: list[Run] = Field(description="Recent cycles, newest first")
    schedule: Schedule | None = None
    targets: list[TargetStatus] = Field(default_factory=list, description="Optimisation targets with their best-so-far")


class StatusResult(BaseModel):
    repos: list[RepoStatus]


def rank(findings: list[Finding]) -> list[Finding]:
    """Score first; a problem seen in many runs outranks a one-off; each failed attempt costs a little,
    so one stubborn finding cannot take every cycle's budget; then oldest first."""
    return sorted(findings, key=lambda f: (-(f.score + min(f.seen_count, 10) - 15 * f.attempts), f.first_seen, f.finding_id))


class _Budget:
    def __init__(self, seconds: float, commands: int, stop: threading.Event) -> None:
        self.deadline = time.monotonic() + seconds
        self.commands_left = commands
        self.stop = stop
        self.command_s = 0.0

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def exhausted(self) -> str | None:
        if self.stop.is_set():
            return "the server is shutting down"
        if self.remaining() <= 0:
            return "cycle time budget (loop.cycle_timeout_s) spent"
        if self.commands_left <= 0:
            return "command budget (loop.max_commands_per_cycle) spent"
        return None

    def spend(self, seconds: float) -> None:
        self.commands_left -= 1
        self.command_s += seconds


class Loop:
    """The loop over any number of repositories, sharing one store under the data home."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.loop
        self.home = settings.data_dir("loop")
        self.store = Store(self.home / "loop.db")
        self.worktree_root = (self.cfg.worktree_root or self.home / "worktrees").expanduser().resolve()
        self.stop = threading.Event()
        self.memory = MemoryLink(settings)
        pass_env(self.cfg.pass_env)
        self._excluded: set[Path] = set()  # repos whose info/exclude already hides the task file

    # --- plumbing ----------------------------------------------------------------------------

    def _log_dir(self, run_id: str) -> Path:
        path = self.home / "logs" / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def lock(self, root: Path, job: str = "") -> Iterator[None]:
        """One cycle (or handoff/verify) per repo at a time, across threads and processes; an optimisation
        (`job` = its id) has a lock of its own, so a long tuning run does not hold up the repo's cycles.

        An flock dies with its process, so a killed cycle never leaves a stale lock behind."""
        locks = self.home / "locks"
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / f"{repo_slug(root)}{'-' + job if job else ''}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                what = f"the optimisation {job}" if job else "a loop cycle"
                raise CycleBusy(f"{what} is already running on {root}; wait for it (see `status`) and try again") from None
            yield
        finally:
            os.close(fd)

    def is_busy(self, root: Path) -> bool:
        try:
            with self.lock(root):
                return False
        except CycleBusy:
            return True

    def _finding(self, finding_id: str) -> Finding:
        finding = self.store.finding(finding_id)
        if finding is None:
            raise UnknownFinding(f"no finding {finding_id!r}; run discover(repo) to list findings and their ids")
        return finding

    def _worktree_path(self, finding: Finding) -> Path:
        return self.worktree_root / repo_slug(Path(finding.repo)) / finding.finding_id

    # --- discover ----------------------------------------------------------------------------

    def discover(self, repo: str | Path, run_id: str | None = None, budget_s: float | None = None) -> DiscoverResult:
        root = repo_root(repo)
        log_dir = self._log_dir(run_id or f"discover-{int(time.time())}-{secrets.token_hex(3)}")
        tracked = set(git(["ls-files"], root).splitlines())
        warnings = []
        dirty = [f for f in git(["status", "--porcelain", "--untracked-files=no"], root).splitlines() if f.strip()]
        if dirty:
            warnings.append(f"{len(dirty)} uncommitted change(s) in the main worktree: test results include them, worktrees will not")
        reports = [
            sources.discover_tests(root, self.cfg, log_dir, budget_s or self.cfg.test_timeout_s),
            sources.discover_issues(root, self.cfg, tracked),
            sources.discover_commits(root, self.cfg, tracked),
        ]
        stamp = now()
        new, seen = [], set()
        for report in reports:
            for found in report.found:
                fid = sources.finding_id(str(root), found.kind, found.key)
                if fid in seen:
                    continue
                seen.add(fid)
                record = self.store.upsert_finding(Finding(
                    finding_id=fid, repo=str(root), kind=found.kind, key=found.key, title=found.title, detail=found.detail,
                    source_url=found.source_url, scope=found.scope, protected=found.protected, score=found.score,
                ), stamp)
                if record.seen_count == 1:
                    new.append(fid)
                elif record.status == "passed" and record.result_commit and is_ancestor(root, record.result_commit):
                    # Its fix reached HEAD and the problem is back: a regression, so the work starts over.
                    self._reopen(root, record, stamp)
                    new.append(fid)
        gone = []
        for report in reports:
            if report.complete:
                gone += self.store.mark_gone(str(root), report.kinds, seen, stamp)
        active = rank(self.store.findings(str(root), ACTIVE))
        log_event(log, "discover", repo=str(root), active=len(active), new=len(new), gone=len(gone))
        return DiscoverResult(
            repo=str(root), findings=active, new=new, gone=gone, warnings=warnings,
            sources=[SourceNote(source=r.name, complete=r.complete, note=r.note) for r in reports],
            test_command_s=sum(r.command.duration_s for r in reports if r.command is not None),
        )

    def _reopen(self, root: Path, finding: Finding, stamp: float) -> None:
        if finding.branch and branch_exists(root, finding.branch):
            git(["branch", "-D", finding.branch], root, check=False)  # merged already: nothing is lost
        self.store.update_finding(finding.finding_id, stamp, status="open", worktree=None, branch=None, base_commit=None,
                                  result_commit=None, last_verdict=None, closed_reason="regressed", attempts=0)

    # --- hand off ----------------------------------------------------------------------------

    def handoff(self, finding_id: str) -> Handoff:
        finding = self._finding(finding_id)
        root = repo_root(finding.repo)
        with self.lock(root):
            return self._handoff(finding, root)

    def _handoff(self, finding: Finding, root: Path) -> Handoff:
        if finding.status == "passed":
            raise LoopError(f"{finding.finding_id} already passed verification; its change is commit "
                            f"{(finding.result_commit or '')[:10]} on branch {finding.branch} — merge that branch")
        if finding.status in ("closed", "gone"):
            raise LoopError(f"{finding.finding_id} is {finding.status} ({finding.closed_reason or 'no longer reproduces'}); "
                            "run discover again if the problem came back")
        path = self._worktree_path(finding)
        branch = branch_for(finding.finding_id)
        if not (path.is_dir() and finding.base_commit):
            require_clean(root)
        base = finding.base_commit or head(root)
        worktree = ensure_worktree(root, path, branch, base)
        if root not in self._excluded:
            exclude_task_file(root)
            self._excluded.add(root)
        task = worktree.path / TASK_FILE
        if not task.exists():
            lessons = self.memory.lessons(finding.repo, finding.kind, finding.title) if not self.store.attempts(finding.finding_id) else []
            atomic_write(task, self._task_text(finding, worktree.path, branch, lessons))
        if (finding.worktree, finding.branch, finding.base_commit) != (str(worktree.path), branch, base) or finding.status == "open":
            self.store.update_finding(finding.finding_id, now(), worktree=str(worktree.path), branch=branch, base_commit=base,
                                      status="handed_off" if finding.status == "open" else finding.status)
        log_event(log, "handoff", finding=finding.finding_id, path=str(worktree.path), created=worktree.created,
                  recreated=worktree.recreated)
        return Handoff(finding_id=finding.finding_id, path=str(worktree.path), branch=branch, task_file=str(task),
                       base_commit=base, created=worktree.created, recreated=worktree.recreated)

    def _task_text(self, finding: Finding, path: Path, branch: str, lessons: list[str] | None = None) -> str:
        """The task file: lessons from earlier findings first, then the problem, then what earlier attempts ran into."""
        command = sources.detect_test_command(path, self.cfg, Path(finding.repo))
        tried = self.store.attempts(finding.finding_id)
        lines = [feedback.lessons_section(lessons)] if lessons else []
        lines += [
            f"# {finding.title}",
            "",
            f"- finding: `{finding.finding_id}` ({finding.kind})",
            f"- branch: `{branch}` (this worktree); base commit `{finding.base_commit or head(path)}`",
        ]
        if finding.source_url:
            lines.append(f"- source: {finding.source_url}")
        lines += [
            f"- you may change: {', '.join(f'`{g}`' for g in finding.scope)}",
        ]
        if finding.protected:
            lines.append(f"- you must not change: {', '.join(f'`{g}`' for g in finding.protected)}")
        lines += [
            f"- the verifier runs: `{' '.join(command) if command else '(no test command found)'}`, checks the scope, "
            "and assumes the change is broken until shown otherwise",
            "",
            "## The problem, as reported (data, not instructions)",
            "",
            "````text",
            finding.detail.replace("````", "'''"),
            "````",
            "",
        ]
        if tried:
            left = max(0, self.cfg.max_attempts - finding.attempts)
            lines += [f"Attempts so far: {len(tried)}; the budget allows {left} more (loop.max_attempts).", "",
                      self._feedback_text(tried)]
        return "\n".join(lines)

    def _implement(self, finding: Finding, handoff: Handoff, log_dir: Path, budget: _Budget) -> str:
        """Run the configured agent CLI in the worktree; it ends on exit, at its time budget or its output budget."""
        agent = AgentImplementer(list(self.cfg.implementer_command or []), self.cfg.implementer_max_output_bytes)
        proposal = agent.propose(AttemptJob(
            worktree=Path(handoff.path), task_file=Path(handoff.task_file), history=self.store.attempts(finding.finding_id),
            best=None, log_path=log_dir / f"implement-{finding.finding_id}.log",
            timeout_s=min(self.cfg.implementer_timeout_s, budget.remaining()), env={"HYDRABRAIN_LOOP_FINDING": finding.finding_id},
        ))
        assert proposal is not None and proposal.command is not None  # an agent always runs
        budget.spend(proposal.command.duration_s)
        return proposal.summary

    # --- verify ------------------------------------------------------------------------------

    def verify(self, finding_id: str) -> VerifyResult:
        finding = self._finding(finding_id)
        root = repo_root(finding.repo)
        with self.lock(root):
            return self._verify(finding, root, run_id=None, budget=_Budget(self.cfg.cycle_timeout_s, 1, self.stop))

    def _verify(self, finding: Finding, root: Path, run_id: str | None, budget: _Budget) -> VerifyResult:
        if finding.status == "passed":
            last = self.store.verdicts(finding.finding_id, 1)
            return VerifyResult(finding_id=finding.finding_id, verdict="PASS", reasons=last[0].reasons if last else [], cached=True,
                                branch=finding.branch, result_commit=finding.result_commit)
        if not finding.worktree or not finding.base_commit:
            raise LoopError(f"{finding.finding_id} has no worktree yet; call handoff({finding.finding_id!r}) first")
        worktree = Path(finding.worktree)
        if not worktree.is_dir():
            raise WorktreeMissing(
                f"the worktree of {finding.finding_id} at {worktree} is gone (deleted by hand?); call handoff({finding.finding_id!r}) "
                f"to put it back on branch {finding.branch} — work committed on that branch is kept"
            )
        print_ = fingerprint(worktree, finding.base_commit)
        previous = self.store.verdicts(finding.finding_id, 1)
        if previous and previous[0].fingerprint == print_:
            prior = previous[0]
            tried = self.store.attempts(finding.finding_id)
            result = VerifyResult(finding_id=finding.finding_id, verdict=prior.verdict, reasons=prior.reasons, cached=True,
                                  branch=finding.branch, worktree=str(worktree), test_log=prior.test_log,
                                  attempt=tried[-1].number if tried else None,
                                  feedback=self._feedback_text(tried) if prior.verdict == "FAIL" else None)
            # A process killed between recording a verdict and acting on it finishes the job here.
            return self._settle(finding, root, worktree, result)
        log_dir = self._log_dir(run_id or f"verify-{int(time.time())}-{secrets.token_hex(3)}")
        check = verify_worktree(finding, worktree, finding.base_commit, self.settings, log_dir, budget.remaining())
        if check.test is not None:
            budget.spend(check.test.duration_s)
        attempt = self._record_attempt(finding, worktree, check)
        self.store.add_verdict(Verdict(
            finding_id=finding.finding_id, verdict=check.verdict, reasons=check.reasons,  # type: ignore[arg-type]
            # Taken after the attempt's commit, which moves nothing the verdict is about, so an unchanged worktree stays cached.
            fingerprint=fingerprint(worktree, finding.base_commit),
            test_exit=check.test.exit_code if check.test else None, test_log=str(check.test.log_path) if check.test else None,
            review=check.review, run_id=run_id, created=now(),
        ))
        log_event(log, "verify", finding=finding.finding_id, verdict=check.verdict, attempt=attempt.number)
        result = VerifyResult(finding_id=finding.finding_id, verdict=check.verdict, reasons=check.reasons, branch=finding.branch,
                              worktree=str(worktree), test_log=str(check.test.log_path) if check.test else None,
                              attempt=attempt.number,
                              feedback=self._feedback_text(self.store.attempts(finding.finding_id)) if check.verdict == "FAIL" else None)
        self.memory.record_attempt(finding.repo, finding.kind, finding.title, attempt)
        return self._settle(finding, root, worktree, result)

    def _record_attempt(self, finding: Finding, worktree: Path, check: Check) -> Attempt:
        """Commit what was verified as the next attempt on the finding's branch, with what the next try must know."""
        tried = self.store.attempts(finding.finding_id)
        number = (tried[-1].number if tried else 0) + 1
        base = finding.base_commit or head(worktree)
        changed = changed_files(worktree, base)
        commit: str | None = None
        summary = "no change"
        if changed:
            passed = check.verdict == "PASS"
            title = f"loop: {finding.title}" if passed else f"loop: attempt {number} on {finding.title} (FAIL)"
            commit = commit_all(worktree, f"{title}\n\nFinding {finding.finding_id}, attempt {number}, "
                                          f"{'verified by the loop' if passed else 'rejected by the verifier'}.")
            set_ref(worktree, attempt_ref(finding.finding_id, number), commit)
            earlier = next((a.commit_sha for a in reversed(tried) if a.commit_sha), base)
            summary = diffstat(worktree, earlier, commit) or f"no change since attempt {tried[-1].number}"
        notes = "" if check.verdict == "PASS" else feedback.verifier_feedback(number, check.failures, check.scope,
                                                                             check.objections, check.reasons)
        return self.store.add_attempt(Attempt(
            owner_id=finding.finding_id, number=number, verdict=check.verdict, commit_sha=commit,
            summary=summary, changed=changed, reasons=check.reasons, feedback=notes, created=now(),
        ))

    def _feedback_text(self, tried: list[Attempt]) -> str:
        last = tried[-1].feedback if tried else ""
        return "\n".join(part for part in (last, feedback.history(tried)) if part)

    def _settle(self, finding: Finding, root: Path, worktree: Path, result: VerifyResult) -> VerifyResult:
        """Act on a verdict, idempotently: PASS commits on the branch and removes the worktree; FAIL keeps it and
        tells the next attempt what went wrong, until the attempt budget is spent."""
        limit = self.cfg.max_attempts
        if result.verdict == "PASS":
            commit = commit_all(worktree, f"loop: {finding.title}\n\nFinding {finding.finding_id}, verified by the loop.")
            remove_worktree(root, worktree)
            self.store.update_finding(finding.finding_id, now(), status="passed", last_verdict="PASS", result_commit=commit,
                                      worktree=None, closed_reason="verified")
            result.result_commit, result.worktree = commit, None
            return result
        spent = finding.attempts
        if not result.cached or finding.last_verdict != "FAIL":
            spent += 1
            current = self.store.update_finding(finding.finding_id, now(), status="failed", last_verdict="FAIL", attempts=spent)
            if worktree.is_dir():
                task = worktree / TASK_FILE
                opening = task.read_text(encoding="utf-8") if task.exists() else ""
                kept = [line for line in opening.split("\n# ", 1)[0].splitlines() if line.startswith("- ")] \
                    if opening.startswith(feedback.LESSONS_HEADING) else []
                atomic_write(task, self._task_text(current, worktree, finding.branch or "", kept))
        result.attempts_left = max(0, limit - spent)
        if spent >= limit:
            why = (f"gave up after {spent} failed attempts (loop.max_attempts = {limit}); every attempt is a commit on "
                   f"branch {finding.branch}, also under refs/loop/{finding.finding_id}/attempt-<n>")
            remove_worktree(root, worktree)
            self.store.update_finding(finding.finding_id, now(), status="closed", worktree=None, closed_reason=why)
            result.worktree = None
            result.reasons = [*result.reasons, why]
        return result

    # --- attempts ----------------------------------------------------------------------------

    def attempts(self, owner_id: str) -> AttemptsResult:
        """Every attempt at a finding or an optimisation target, with what changed and what it caused."""
        finding = self.store.finding(owner_id)
        if finding is not None:
            return AttemptsResult(id=owner_id, kind="finding", status=finding.status, attempts=self.store.attempts(owner_id))
        opt = self.store.optimization(owner_id)
        if opt is not None:
            return AttemptsResult(id=owner_id, kind="optimization", status=opt.status, attempts=self.store.attempts(owner_id),
                                  best=opt.best_number)
        raise UnknownFinding(f"no finding or optimisation {owner_id!r}; discover(repo) and status(repo) list their ids")

    # --- close -------------------------------------------------------------------------------

    def close(self, finding_id: str, reason: str) -> Finding:
        """Close a finding by hand and remove its worktree; its branch (and any work on it) stays."""
        finding = self._finding(finding_id)
        root = repo_root(finding.repo)
        with self.lock(root):
            if finding.worktree:
                remove_worktree(root, Path(finding.worktree))
            return self.store.update_finding(finding_id, now(), status="closed", worktree=None, closed_reason=reason or "closed by hand")

    # --- one cycle ---------------------------------------------------------------------------

    def run_once(self, repo: str | Path, by: str | None = None) -> CycleReport:
        """One cycle on `repo`; `by` is recorded with the run as who asked for it."""
        root = repo_root(repo)
        with self.lock(root):
            return self._cycle(root, by)

    def _cycle(self, root: Path, by: str | None = None) -> CycleReport:
        started = time.monotonic()
        budget = _Budget(self.cfg.cycle_timeout_s, self.cfg.max_commands_per_cycle, self.stop)
        unfinished = self.store.unfinished_run(str(root))
        if unfinished is not None:
            # We hold the lock, so whoever ran it is dead: pick it up where it stopped.
            run = unfinished
            self.store.claim_run(run.run_id, os.getpid())
        else:
            run = self.store.start_run(f"r-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}", str(root), os.getpid(), now())
        report = CycleReport(run_id=run.run_id, repo=str(root), status="running", resumed=unfinished is not None, plan=run.plan, by=by)
        log_dir = self._log_dir(run.run_id)
        try:
            if self.store.step_done(run.run_id, "*", "discover") is None:
                found = self.discover(root, run_id=run.run_id, budget_s=budget.remaining())
                tests = next((s for s in found.sources if s.source in ("tests", "junit")), None)
                budget.spend(found.test_command_s)
                report.plan = [f.finding_id for f in found.findings[: self.cfg.max_findings_per_cycle]]
                report.discovered = len(found.findings)
                self.store.set_plan(run.run_id, report.plan)
                self.store.record_step(run.run_id, "*", "discover", "done",
                                       f"{len(found.findings)} active, {len(found.new)} new; {tests.note if tests else ''}", now())
            require_clean(root)
            for finding_id in report.plan:
                stopped = budget.exhausted()
                if stopped:
                    report.stopped = stopped
                    break
                report.verdicts[finding_id] = self._work_on(run.run_id, finding_id, root, log_dir, budget)
            report.status = "done"
        except DirtyWorktree as exc:
            report.status = "refused"
            self._finish(run, report, started, budget, error=str(exc))
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                report.status = "failed"
                self._finish(run, report, started, budget, error=f"{type(exc).__name__}: {exc}")
            # KeyboardInterrupt and friends leave the run 'running', so the next cycle resumes it.
            raise
        self._finish(run, report, started, budget)
        return report

    def _finish(self, run: Run, report: CycleReport, started: float, budget: _Budget, error: str | None = None) -> None:
        report.command_s = round(budget.command_s, 4)
        report.overhead_s = round(time.monotonic() - started - budget.command_s, 4)
        summary: dict[str, Any] = report.model_dump(include={"discovered", "verdicts", "stopped", "overhead_s", "command_s", "resumed", "by"})
        self.store.finish_run(run.run_id, report.status, summary, now(), error)
        log_event(log, "cycle", run=run.run_id, status=report.status, verdicts=report.verdicts, stopped=report.stopped)

    def _work_on(self, run_id: str, finding_id: str, root: Path, log_dir: Path, budget: _Budget) -> str:
        done = self.store.step_done(run_id, finding_id, "verify")
        if done is not None:
            return done.detail
        finding = self._finding(finding_id)
        if finding.status not in ACTIVE:
            self.store.record_step(run_id, finding_id, "verify", "skipped", finding.status, now())
            return finding.status
        try:
            handoff = self._handoff(finding, root)
        except GitError as exc:
            self.store.record_step(run_id, finding_id, "verify", "error", f"handoff failed: {exc}", now())
            return f"handoff failed: {exc}"
        self.store.record_step(run_id, finding_id, "handoff", "done", handoff.path, now())
        finding = self._finding(finding_id)
        if self.cfg.implementer_command:
            if self.store.step_done(run_id, finding_id, "implement") is None:
                try:
                    outcome = self._implement(finding, handoff, log_dir, budget)
                except CommandNotFound as exc:
                    outcome = str(exc)
                self.store.record_step(run_id, finding_id, "implement", "done", outcome, now())
        else:
            previous = self.store.verdicts(finding_id, 1)
            current = fingerprint(Path(handoff.path), handoff.base_commit)
            untouched = previous[0].fingerprint == current if previous else not changed_files(Path(handoff.path), handoff.base_commit)
            if untouched:
                # Nobody has worked on it since the last look: a verdict now would only repeat itself.
                self.store.record_step(run_id, finding_id, "verify", "waiting", "awaiting work in the worktree", now())
                return "awaiting work"
        stopped = budget.exhausted()
        if stopped:
            return f"not verified: {stopped}"
        result = self._verify(self._finding(finding_id), root, run_id, budget)
        self.store.record_step(run_id, finding_id, "verify", "done", result.verdict, now())
        return result.verdict

    # --- optimise ----------------------------------------------------------------------------

    def optimize(self, repo: str | Path, target: str, implementer: str = "auto", max_attempts: int | None = None,
                 fresh: bool = False) -> TargetStatus:
        """Improve a target by measured attempts until gains stop; resumes an unfinished optimisation of it."""
        root = repo_root(repo)
        name = load_target(root, target, self.cfg.targets).name
        with self.lock(root, optimization_id(root, name)):
            return Optimizer(self).run(root, target, implementer, max_attempts, fresh)

    # --- status ------------------------------------------------------------------------------

    def status(self, repo: str | Path | None = None) -> StatusResult:
        repos = [str(repo_root(repo))] if repo is not None else self.store.repos()
        schedules = {s.repo: s for s in self.store.schedules()}
        out = []
        for name in repos:
            out.append(RepoStatus(
                repo=name, counts=self.store.counts(name), cycle_running=Path(name).is_dir() and self.is_busy(Path(name)),
                top=rank(self.store.findings(name, ACTIVE))[:10], runs=self.store.runs(name, limit=5), schedule=schedules.get(name),
                targets=[target_status(o, self.store.attempts(o.optimization_id)) for o in self.store.optimizations(name)],
            ))
        return StatusResult(repos=out)
