"""The loop's state: findings, runs, steps, verdicts and schedules in one SQLite file (WAL).

Every write is one transaction, so a process killed at any point leaves either the old row or the
new one. Steps are keyed by (run, finding, step): recording a step twice is a no-op, which is what
lets an interrupted cycle resume where it stopped.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

FindingStatus = Literal["open", "handed_off", "failed", "passed", "closed", "gone"]
# Statuses a cycle still works on; `passed` waits for its branch to be merged, `gone` no longer reproduces.
ACTIVE = ("open", "handed_off", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS findings (
    finding_id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    title TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    source_url TEXT,
    scope TEXT NOT NULL DEFAULT '[]',
    protected TEXT NOT NULL DEFAULT '[]',
    score REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'open',
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    seen_count INTEGER NOT NULL DEFAULT 1,
    branch TEXT,
    worktree TEXT,
    base_commit TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_verdict TEXT,
    result_commit TEXT,
    closed_reason TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS findings_repo ON findings(repo, status);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    pid INTEGER,
    plan TEXT NOT NULL DEFAULT '[]',
    summary TEXT NOT NULL DEFAULT '{}',
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_repo ON runs(repo, started);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    finding_id TEXT NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    finished REAL NOT NULL,
    PRIMARY KEY (run_id, finding_id, step)
);
CREATE TABLE IF NOT EXISTS verdicts (
    verdict_id INTEGER PRIMARY KEY AUTOINCREMENT,
    finding_id TEXT NOT NULL,
    run_id TEXT,
    verdict TEXT NOT NULL,
    reasons TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    test_exit INTEGER,
    test_log TEXT,
    review TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_finding ON verdicts(finding_id, verdict_id);
CREATE TABLE IF NOT EXISTS attempts (
    owner_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    commit_sha TEXT,
    fingerprint TEXT,
    summary TEXT NOT NULL DEFAULT '',
    changed TEXT NOT NULL DEFAULT '[]',
    reasons TEXT NOT NULL DEFAULT '[]',
    feedback TEXT NOT NULL DEFAULT '',
    measurement TEXT,
    config TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (owner_id, number)
);
CREATE TABLE IF NOT EXISTS optimizations (
    optimization_id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    target TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    branch TEXT NOT NULL,
    worktree TEXT,
    base_commit TEXT NOT NULL,
    best_number INTEGER,
    stopped TEXT,
    started REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    repo TEXT PRIMARY KEY,
    every_seconds REAL,
    cron TEXT,
    created REAL NOT NULL,
    last_run_id TEXT
);
"""


class Finding(BaseModel):
    finding_id: str = Field(description="Stable id: the same problem keeps the same id across runs")
    repo: str
    kind: str = Field(description="failing_test, issue, todo or untested_change")
    key: str = Field(description="What identifies the problem inside its kind")
    title: str
    detail: str = ""
    source_url: str | None = None
    scope: list[str] = Field(default_factory=list, description="Path globs a fix may change")
    protected: list[str] = Field(default_factory=list, description="Path globs a fix must not change")
    score: float = 0.0
    status: FindingStatus = "open"
    first_seen: float = 0.0
    last_seen: float = 0.0
    seen_count: int = 1
    branch: str | None = None
    worktree: str | None = None
    base_commit: str | None = None
    attempts: int = 0
    last_verdict: str | None = None
    result_commit: str | None = None
    closed_reason: str | None = None


class Verdict(BaseModel):
    finding_id: str
    verdict: Literal["PASS", "FAIL"]
    reasons: list[str]
    fingerprint: str = Field(description="Hash of the worktree's change the verdict is about")
    test_exit: int | None = None
    test_log: str | None = None
    review: str | None = None
    run_id: str | None = None
    created: float = 0.0


class Measurement(BaseModel):
    values: list[float] = Field(description="The metric from each repeat of the benchmark")
    mean: float
    stdev: float = Field(description="Sample standard deviation over the repeats: the noise")
    n: int


class Attempt(BaseModel):
    """One try at a finding or an optimisation target: what changed, what the verifier or the benchmark said."""

    owner_id: str = Field(description="The finding_id (or optimization_id) this attempt belongs to")
    number: int = Field(description="1, 2, ...; 0 is an optimisation's unchanged baseline")
    verdict: str = Field(description="PASS / FAIL for a finding; baseline, gain, within noise, worse or invalid for a target")
    commit_sha: str | None = Field(None, description="The commit holding this attempt (ref refs/loop/<owner>/<number>); None when nothing changed")
    fingerprint: str | None = None
    summary: str = Field("", description="What this attempt changed")
    changed: list[str] = Field(default_factory=list, description="Files changed against the base commit")
    reasons: list[str] = Field(default_factory=list)
    feedback: str = Field("", description="What the next attempt is told about this one (markdown)")
    measurement: Measurement | None = None
    config: dict[str, Any] | None = Field(None, description="Search parameters this attempt tried")
    created: float = 0.0


class Optimization(BaseModel):
    optimization_id: str
    repo: str
    target: str = Field(description="The target's name")
    spec: dict[str, Any] = Field(description="The target as it was loaded when the optimisation started")
    status: str = Field(description="running, done or failed")
    branch: str
    worktree: str | None = None
    base_commit: str
    best_number: int | None = Field(None, description="The best valid attempt so far (0: the baseline)")
    stopped: str | None = Field(None, description="Why it stopped")
    started: float
    updated: float


class Step(BaseModel):
    finding_id: str
    step: str
    status: str
    detail: str = ""
    finished: float


class Run(BaseModel):
    run_id: str
    repo: str
    status: str = Field(description="running, done, failed, interrupted or refused")
    started: float
    finished: float | None = None
    plan: list[str] = Field(default_factory=list, description="Finding ids this cycle works on, in order")
    summary: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    steps: list[Step] = Field(default_factory=list)


class Schedule(BaseModel):
    repo: str
    every_seconds: float | None = None
    cron: str | None = None
    created: float
    last_run_id: str | None = None


_JSON_FIELDS = {"scope", "protected", "plan", "summary", "reasons"}


def _row(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON_FIELDS & data.keys():
        data[name] = json.loads(data[name])
    return data


class Store:
    """The loop's SQLite database. Safe to share between threads: each call opens its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        finally:
            db.close()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One long-lived connection per thread: closing the last connection to a WAL database
        # checkpoints it, which made every short-lived connection cost milliseconds.
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        if db.in_transaction:  # re-entered from inside a transaction of this thread
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- findings ---------------------------------------------------------------------------

    def upsert_finding(self, found: Finding, now: float) -> Finding:
        """Record a sighting: new findings are inserted, known ones counted; `gone` ones reopen."""
        with self._db() as db:
            row = db.execute("SELECT * FROM findings WHERE finding_id = ?", (found.finding_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO findings (finding_id, repo, kind, key, title, detail, source_url, scope, protected,"
                    " score, status, first_seen, last_seen, seen_count, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, 1, ?)",
                    (found.finding_id, found.repo, found.kind, found.key, found.title, found.detail, found.source_url,
                     json.dumps(found.scope), json.dumps(found.protected), found.score, now, now, now),
                )
            else:
                status = "open" if row["status"] == "gone" else row["status"]
                db.execute(
                    "UPDATE findings SET title = ?, detail = ?, source_url = ?, scope = ?, protected = ?, score = ?,"
                    " status = ?, last_seen = ?, seen_count = seen_count + 1, updated = ? WHERE finding_id = ?",
                    (found.title, found.detail, found.source_url, json.dumps(found.scope), json.dumps(found.protected),
                     found.score, status, now, now, found.finding_id),
                )
            return Finding(**_row(db.execute("SELECT * FROM findings WHERE finding_id = ?", (found.finding_id,)).fetchone()))

    def mark_gone(self, repo: str, kinds: list[str], seen: set[str], now: float) -> list[str]:
        """Open findings of `kinds` that this discovery did not see no longer reproduce."""
        with self._db() as db:
            rows = db.execute(
                f"SELECT finding_id FROM findings WHERE repo = ? AND status = 'open' AND kind IN ({','.join('?' * len(kinds))})",
                (repo, *kinds),
            ).fetchall()
            gone = [r["finding_id"] for r in rows if r["finding_id"] not in seen]
            db.executemany("UPDATE findings SET status = 'gone', updated = ? WHERE finding_id = ?", [(now, f) for f in gone])
        return gone

    def finding(self, finding_id: str) -> Finding | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM findings WHERE finding_id = ?", (finding_id,)).fetchone()
        return Finding(**_row(row)) if row else None

    def findings(self, repo: str | None = None, statuses: tuple[str, ...] | None = None) -> list[Finding]:
        query, args = "SELECT * FROM findings WHERE 1 = 1", []
        if repo is not None:
            query += " AND repo = ?"
            args.append(repo)
        if statuses:
            query += f" AND status IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        query += " ORDER BY score DESC, first_seen ASC, finding_id ASC"
        with self._db() as db:
            return [Finding(**_row(r)) for r in db.execute(query, args).fetchall()]

    def update_finding(self, finding_id: str, now: float, **fields: Any) -> Finding:
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [json.dumps(v) if name in _JSON_FIELDS else v for name, v in fields.items()]
        with self._db() as db:
            db.execute(f"UPDATE findings SET {sets}, updated = ? WHERE finding_id = ?", (*values, now, finding_id))
            row = db.execute("SELECT * FROM findings WHERE finding_id = ?", (finding_id,)).fetchone()
        return Finding(**_row(row))

    def counts(self, repo: str | None = None) -> dict[str, int]:
        query = "SELECT status, COUNT(*) AS n FROM findings" + (" WHERE repo = ?" if repo else "") + " GROUP BY status"
        with self._db() as db:
            return {r["status"]: r["n"] for r in db.execute(query, (repo,) if repo else ()).fetchall()}

    def repos(self) -> list[str]:
        with self._db() as db:
            rows = db.execute("SELECT repo FROM findings UNION SELECT repo FROM runs UNION SELECT repo FROM schedules"
                              " UNION SELECT repo FROM optimizations").fetchall()
        return sorted(r["repo"] for r in rows)

    # --- runs and steps ---------------------------------------------------------------------

    def start_run(self, run_id: str, repo: str, pid: int, now: float) -> Run:
        with self._db() as db:
            db.execute("INSERT INTO runs (run_id, repo, status, started, pid) VALUES (?, ?, 'running', ?, ?)", (run_id, repo, now, pid))
        return Run(run_id=run_id, repo=repo, status="running", started=now)

    def claim_run(self, run_id: str, pid: int) -> None:
        with self._db() as db:
            db.execute("UPDATE runs SET pid = ?, status = 'running' WHERE run_id = ?", (pid, run_id))

    def set_plan(self, run_id: str, plan: list[str]) -> None:
        with self._db() as db:
            db.execute("UPDATE runs SET plan = ? WHERE run_id = ?", (json.dumps(plan), run_id))

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any], now: float, error: str | None = None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE runs SET status = ?, summary = ?, finished = ?, error = ? WHERE run_id = ?",
                (status, json.dumps(summary), now, error, run_id),
            )

    def unfinished_run(self, repo: str) -> Run | None:
        """The newest cycle of `repo` that never finished (its process died), if any."""
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM runs WHERE repo = ? AND status IN ('running', 'interrupted') ORDER BY started DESC LIMIT 1", (repo,)
            ).fetchone()
        return self._run(row) if row else None

    def run(self, run_id: str) -> Run | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return self._run(row) if row else None

    def runs(self, repo: str | None = None, limit: int = 10) -> list[Run]:
        query = "SELECT * FROM runs" + (" WHERE repo = ?" if repo else "") + " ORDER BY started DESC LIMIT ?"
        with self._db() as db:
            rows = db.execute(query, (repo, limit) if repo else (limit,)).fetchall()
        return [self._run(r, with_steps=False) for r in rows]

    def _run(self, row: sqlite3.Row, with_steps: bool = True) -> Run:
        data = _row(row)
        data.pop("pid", None)
        run = Run(**data)
        if with_steps:
            with self._db() as db:
                steps = db.execute("SELECT * FROM steps WHERE run_id = ? ORDER BY finished, rowid", (run.run_id,)).fetchall()
            run.steps = [Step(**{k: s[k] for k in ("finding_id", "step", "status", "detail", "finished")}) for s in steps]
        return run

    def step_done(self, run_id: str, finding_id: str, step: str) -> Step | None:
        with self._db() as db:
            row = db.execute(
                "SELECT * FROM steps WHERE run_id = ? AND finding_id = ? AND step = ?", (run_id, finding_id, step)
            ).fetchone()
        return Step(**{k: row[k] for k in ("finding_id", "step", "status", "detail", "finished")}) if row else None

    def record_step(self, run_id: str, finding_id: str, step: str, status: str, detail: str, now: float) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO steps (run_id, finding_id, step, status, detail, finished) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, finding_id, step, status, detail, now),
            )

    # --- verdicts ---------------------------------------------------------------------------

    def add_verdict(self, verdict: Verdict) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO verdicts (finding_id, run_id, verdict, reasons, fingerprint, test_exit, test_log, review, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (verdict.finding_id, verdict.run_id, verdict.verdict, json.dumps(verdict.reasons), verdict.fingerprint,
                 verdict.test_exit, verdict.test_log, verdict.review, verdict.created),
            )

    def verdicts(self, finding_id: str, limit: int = 20) -> list[Verdict]:
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM verdicts WHERE finding_id = ? ORDER BY verdict_id DESC LIMIT ?", (finding_id, limit)
            ).fetchall()
        out = []
        for r in rows:
            data = _row(r)
            data.pop("verdict_id")
            out.append(Verdict(**data))
        return out

    # --- attempts ---------------------------------------------------------------------------

    def add_attempt(self, attempt: Attempt) -> Attempt:
        """Record an attempt; recording the same number twice keeps the first (a resumed step repeats itself)."""
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO attempts (owner_id, number, verdict, commit_sha, fingerprint, summary, changed, reasons,"
                " feedback, measurement, config, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (attempt.owner_id, attempt.number, attempt.verdict, attempt.commit_sha, attempt.fingerprint, attempt.summary,
                 json.dumps(attempt.changed), json.dumps(attempt.reasons), attempt.feedback,
                 attempt.measurement.model_dump_json() if attempt.measurement else None,
                 json.dumps(attempt.config) if attempt.config is not None else None, attempt.created),
            )
        return attempt

    def attempts(self, owner_id: str) -> list[Attempt]:
        """Every attempt of a finding or optimisation, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM attempts WHERE owner_id = ? ORDER BY number", (owner_id,)).fetchall()
        out = []
        for r in rows:
            data = dict(r)
            for name in ("changed", "reasons", "measurement", "config"):
                if data[name] is not None:
                    data[name] = json.loads(data[name])
            out.append(Attempt(**data))
        return out

    def drop_attempts(self, owner_id: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM attempts WHERE owner_id = ?", (owner_id,))

    # --- optimisations ----------------------------------------------------------------------

    def save_optimization(self, opt: Optimization) -> Optimization:
        with self._db() as db:
            db.execute(
                "INSERT INTO optimizations (optimization_id, repo, target, spec, status, branch, worktree, base_commit, best_number,"
                " stopped, started, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(optimization_id) DO UPDATE SET spec = excluded.spec, status = excluded.status,"
                " branch = excluded.branch, worktree = excluded.worktree, base_commit = excluded.base_commit,"
                " best_number = excluded.best_number, stopped = excluded.stopped, started = excluded.started,"
                " updated = excluded.updated",
                (opt.optimization_id, opt.repo, opt.target, json.dumps(opt.spec), opt.status, opt.branch, opt.worktree,
                 opt.base_commit, opt.best_number, opt.stopped, opt.started, opt.updated),
            )
        return opt

    def optimization(self, optimization_id: str) -> Optimization | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM optimizations WHERE optimization_id = ?", (optimization_id,)).fetchone()
        return self._optimization(row) if row else None

    def optimizations(self, repo: str) -> list[Optimization]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM optimizations WHERE repo = ? ORDER BY target", (repo,)).fetchall()
        return [self._optimization(r) for r in rows]

    @staticmethod
    def _optimization(row: sqlite3.Row) -> Optimization:
        data = dict(row)
        data["spec"] = json.loads(data["spec"])
        return Optimization(**data)

    # --- schedules --------------------------------------------------------------------------

    def set_schedule(self, schedule: Schedule) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO schedules (repo, every_seconds, cron, created) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(repo) DO UPDATE SET every_seconds = excluded.every_seconds, cron = excluded.cron,"
                " created = excluded.created",
                (schedule.repo, schedule.every_seconds, schedule.cron, schedule.created),
            )

    def drop_schedule(self, repo: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM schedules WHERE repo = ?", (repo,)).rowcount > 0

    def schedules(self) -> list[Schedule]:
        with self._db() as db:
            return [Schedule(**dict(r)) for r in db.execute("SELECT * FROM schedules ORDER BY repo").fetchall()]

    def schedule_ran(self, repo: str, run_id: str) -> None:
        with self._db() as db:
            db.execute("UPDATE schedules SET last_run_id = ? WHERE repo = ?", (run_id, repo))


def now() -> float:
    return time.time()
