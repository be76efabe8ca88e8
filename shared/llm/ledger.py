"""The cost ledger, budgets and the prompt caches, in one SQLite file (WAL) under the data home.

Every provider attempt and every cache hit is one row, so spend per tenant, feature and model is
a query, and a budget check is a sum over its period.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hydrabrain.shared.config import BudgetConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    tenant TEXT,
    feature TEXT,
    task TEXT,
    provider TEXT,
    model TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_ms REAL NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts);
CREATE INDEX IF NOT EXISTS calls_tenant_ts ON calls(tenant, ts);
CREATE INDEX IF NOT EXISTS calls_feature_ts ON calls(feature, ts);
CREATE TABLE IF NOT EXISTS exact_cache (
    key TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS semantic_cache (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    vector BLOB NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS semantic_scope ON semantic_cache(tenant, scope);
"""


def period_start(period: str, now: float | None = None) -> float:
    """Start of the budget period containing `now` (UTC calendar day or month; 0 for total)."""
    if period == "total":
        return 0.0
    moment = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp()


@dataclass
class CallRecord:
    tenant: str | None
    feature: str | None
    task: str
    provider: str | None
    model: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float
    outcome: str  # ok | error | cache_exact | cache_semantic | refused
    error: str | None = None


class Ledger:
    """Thread-safe; one connection per instance, WAL so readers never block the writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._semantic: dict[tuple[str, str], tuple[np.ndarray, list[int], float]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()  # closing twice is harmless

    # --- ledger --------------------------------------------------------------------------------

    def record(self, rec: CallRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO calls (ts, tenant, feature, task, provider, model, input_tokens, output_tokens,"
                " cost_usd, latency_ms, outcome, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    time.time(), rec.tenant, rec.feature, rec.task, rec.provider, rec.model, rec.input_tokens,
                    rec.output_tokens, rec.cost_usd, rec.latency_ms, rec.outcome, rec.error,
                ),
            )

    def spend(self, tenant: str | None = None, feature: str | None = None, since: float = 0.0, provider: str | None = None) -> float:
        """Dollars spent since a moment, narrowed by whichever of tenant/feature/provider is given."""
        where, args = ["ts >= ?"], [since]
        for column, value in (("tenant", tenant), ("feature", feature), ("provider", provider)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        with self._lock:
            row = self._db.execute(f"SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE {' AND '.join(where)}", args).fetchone()
        return float(row[0])

    def summary(self, tenant: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
        """Calls, tokens, cost and mean latency grouped by tenant, feature, provider, model and outcome."""
        where, args = ["ts >= ?"], [since]
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, feature, provider, model, outcome, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
                " SUM(cost_usd), AVG(latency_ms) FROM calls WHERE " + " AND ".join(where)
                + " GROUP BY tenant, feature, provider, model, outcome ORDER BY SUM(cost_usd) DESC, COUNT(*) DESC",
                args,
            ).fetchall()
        keys = ("tenant", "feature", "provider", "model", "outcome", "calls", "input_tokens", "output_tokens", "cost_usd", "mean_latency_ms")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # --- budgets -------------------------------------------------------------------------------

    def budget_room(self, budget: BudgetConfig, tenant: str | None, feature: str | None, now: float | None = None) -> float | None:
        """Dollars left under a budget for this call, or None when the budget does not apply to it."""
        if budget.tenant is not None and budget.tenant != tenant:
            return None
        if budget.feature is not None and budget.feature != feature:
            return None
        spent = self.spend(tenant=budget.tenant, feature=budget.feature, since=period_start(budget.period, now))
        return budget.limit_usd - spent

    # --- caches --------------------------------------------------------------------------------

    def exact_get(self, key: str, ttl_s: float) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM exact_cache WHERE key = ? AND created >= ?", (key, time.time() - ttl_s)).fetchone()
        return json.loads(row[0]) if row else None

    def exact_put(self, key: str, tenant: str, answer: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO exact_cache (key, tenant, answer, created) VALUES (?,?,?,?)",
                (key, tenant, json.dumps(answer), time.time()),
            )

    def _semantic_matrix(self, tenant: str, scope: str, ttl_s: float) -> tuple[np.ndarray, list[int]]:
        cached = self._semantic.get((tenant, scope))
        if cached is not None and cached[2] < time.time() - ttl_s:
            cached = None  # the oldest entry has expired: reload without it
        if cached is None:
            rows = self._db.execute("SELECT id, vector, created FROM semantic_cache WHERE tenant = ? AND scope = ? AND created >= ?",
                                    (tenant, scope, time.time() - ttl_s)).fetchall()
            ids = [r[0] for r in rows]
            matrix = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0), np.float32)
            oldest = min((r[2] for r in rows), default=float("inf"))
            cached = (matrix, ids, oldest)
            self._semantic[(tenant, scope)] = cached
        return cached

    def semantic_get(self, tenant: str, scope: str, vector: np.ndarray, threshold: float, ttl_s: float) -> tuple[dict[str, Any], float] | None:
        """The closest cached answer of this tenant and scope if its cosine reaches the threshold."""
        with self._lock:
            matrix, ids, _ = self._semantic_matrix(tenant, scope, ttl_s)
            if not ids:
                return None
            scores = matrix @ vector.astype(np.float32)
            best = int(np.argmax(scores))
            if float(scores[best]) < threshold:
                return None
            row = self._db.execute("SELECT answer FROM semantic_cache WHERE id = ?", (ids[best],)).fetchone()
        return (json.loads(row[0]), float(scores[best])) if row else None

    def semantic_put(self, tenant: str, scope: str, vector: np.ndarray, answer: dict[str, Any]) -> None:
        blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        with self._lock:
            self._db.execute(
                "INSERT INTO semantic_cache (tenant, scope, vector, answer, created) VALUES (?,?,?,?,?)",
                (tenant, scope, blob, json.dumps(answer), time.time()),
            )
            self._semantic.pop((tenant, scope), None)
