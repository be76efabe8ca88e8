"""A lexical index on SQLite FTS5 (BM25), one file per namespace under the data home.

Queries are free text: they are split into words and OR-ed, each quoted, so user input can never be
read as FTS5 syntax. ``where`` filters are equality on the metadata stored beside each document.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydrabrain.shared.config import Settings

_WORD = re.compile(r"[\w][\w'-]*", re.UNICODE)
STOPWORDS = frozenset(
    "a an and are as at be but by do does did for from has have how i if in into is it its of on or "
    "that the their then there these this to was were what when where which who whom why will with "
    "you your we our they them he she his her not no can could should would about after before".split()
)


@dataclass(frozen=True)
class LexicalHit:
    id: str
    score: float  # higher is better (negated BM25)
    meta: dict[str, Any]


def query_terms(text: str) -> list[str]:
    """Lower-cased content words of `text`, stopwords dropped, order kept, duplicates removed."""
    words = [w.lower().strip("'-") for w in _WORD.findall(text)]
    return list(dict.fromkeys(w for w in words if w and w not in STOPWORDS))


class LexicalIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS docs (rid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
            CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(body, tokenize = 'porter unicode61');
            """
        )

    def add(self, doc_id: str, text: str, meta: Mapping[str, Any] | None = None) -> None:
        self.add_many([(doc_id, text, meta or {})])

    def add_many(self, docs: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Insert or replace documents in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for doc_id, text, meta in docs:
                    row = self._db.execute("SELECT rid FROM docs WHERE id = ?", (doc_id,)).fetchone()
                    if row:
                        self._db.execute("DELETE FROM fts WHERE rowid = ?", (row[0],))
                        self._db.execute("UPDATE docs SET meta = ? WHERE rid = ?", (json.dumps(dict(meta)), row[0]))
                        rid = row[0]
                    else:
                        rid = self._db.execute("INSERT INTO docs (id, meta) VALUES (?, ?)", (doc_id, json.dumps(dict(meta)))).lastrowid
                    self._db.execute("INSERT INTO fts (rowid, body) VALUES (?, ?)", (rid, text))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, doc_ids: Iterable[str] | None = None, where: Mapping[str, Any] | None = None) -> int:
        with self._lock:
            rids: list[int] = []
            if doc_ids is not None:
                for doc_id in doc_ids:
                    row = self._db.execute("SELECT rid FROM docs WHERE id = ?", (doc_id,)).fetchone()
                    if row:
                        rids.append(row[0])
            if where:
                clause, args = self._where(where)
                rids += [r[0] for r in self._db.execute(f"SELECT rid FROM docs WHERE {clause}", args)]
            self._db.execute("BEGIN IMMEDIATE")
            for rid in set(rids):
                self._db.execute("DELETE FROM fts WHERE rowid = ?", (rid,))
                self._db.execute("DELETE FROM docs WHERE rid = ?", (rid,))
            self._db.execute("COMMIT")
            return len(set(rids))

    @staticmethod
    def _where(where: Mapping[str, Any]) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for key, value in where.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"filter field {key!r} must be an identifier")
            if isinstance(value, (list, tuple, set)):
                clauses.append(f"json_extract(meta, '$.{key}') IN ({','.join('?' * len(value))})")
                args += list(value)
            else:
                clauses.append(f"json_extract(meta, '$.{key}') = ?")
                args.append(int(value) if isinstance(value, bool) else value)
        return " AND ".join(clauses) or "1=1", args

    def search(self, query: str, k: int = 10, where: Mapping[str, Any] | None = None) -> list[LexicalHit]:
        terms = query_terms(query)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        clause, args = self._where(where or {})
        sql = (
            "SELECT docs.id, -bm25(fts) AS score, docs.meta FROM fts JOIN docs ON docs.rid = fts.rowid "
            f"WHERE fts MATCH ? AND {clause} ORDER BY bm25(fts) LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, [match, *args, k]).fetchall()
        return [LexicalHit(r[0], float(r[1]), json.loads(r[2])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM fts")
            self._db.execute("DELETE FROM docs")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_lexical_index(settings: Settings, namespace: str) -> LexicalIndex:
    if not re.match(r"^[A-Za-z0-9_-]+$", namespace):
        raise ValueError(f"namespace {namespace!r} may hold only letters, digits, '-' and '_'")
    return LexicalIndex(settings.home / "lexical" / f"{namespace}.sqlite")
