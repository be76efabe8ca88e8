"""A lexical index on SQLite FTS5 (BM25), one file per namespace under the data home.

Queries are free text: they are split into words and OR-ed, each quoted, so user input can never be
read as FTS5 syntax. ``where`` filters are equality on the metadata stored beside each document.

FTS5's ``bm25()`` takes its statistics (document count, average length, document frequency) from
the whole table, so one tenant's scores move when another tenant writes. An index opened with
``scope_field`` (say ``"user"``) also keeps a small per-scope inverted index beside FTS5; a search
whose ``where`` names one value of that field is then scored with BM25 statistics of that scope
only, and nothing outside the scope can change its order. Other searches use FTS5 as before.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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


def stem(word: str) -> str:
    """A light suffix stripper so that plurals and simple inflections meet (scoped BM25 only)."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def index_terms(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """Stemmed content words of `text`, with repeats (what scoped BM25 counts)."""
    words = (w.lower().strip("'-") for w in _WORD.findall(text))
    return [stem(w) for w in words if w and w not in stopwords]


BM25_K1 = 1.2
BM25_B = 0.75


def query_terms(text: str) -> list[str]:
    """Lower-cased content words of `text`, stopwords dropped, order kept, duplicates removed."""
    words = [w.lower().strip("'-") for w in _WORD.findall(text)]
    return list(dict.fromkeys(w for w in words if w and w not in STOPWORDS))


class LexicalIndex:
    def __init__(self, path: Path, scope_field: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not left in free pages
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS docs (rid INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
            CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(body, tokenize = 'porter unicode61');
            CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            """
        )
        row = self._db.execute("SELECT value FROM settings WHERE name = 'scope_field'").fetchone()
        if scope_field is not None and row is not None and row[0] != scope_field:
            raise ValueError(f"{path} is scoped by {row[0]!r}, not {scope_field!r}")
        # Once a file is scoped, every writer keeps the scoped statistics, whoever opens it.
        self.scope_field = scope_field or (row[0] if row else None)
        if self.scope_field is not None:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.scope_field):
                raise ValueError(f"scope field {self.scope_field!r} must be an identifier")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS scoped_terms (scope TEXT NOT NULL, term TEXT NOT NULL, rid INTEGER NOT NULL, tf INTEGER NOT NULL,
                    PRIMARY KEY (scope, term, rid)) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS scoped_docs (rid INTEGER PRIMARY KEY, scope TEXT NOT NULL, len INTEGER NOT NULL);
                CREATE INDEX IF NOT EXISTS scoped_docs_scope ON scoped_docs(scope);
                """
            )
            self._db.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('scope_field', ?)", (self.scope_field,))
            self._backfill_scoped()

    def _backfill_scoped(self) -> None:
        """Documents written before the index was scoped get their per-scope statistics now."""
        with self._lock:
            rows = self._db.execute(
                "SELECT docs.rid, docs.meta, fts.body FROM docs JOIN fts ON fts.rowid = docs.rid "
                "WHERE docs.rid NOT IN (SELECT rid FROM scoped_docs)"
            ).fetchall()
            if not rows:
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for rid, meta, body in rows:
                    self._add_scoped(rid, body, json.loads(meta))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _add_scoped(self, rid: int, text: str, meta: Mapping[str, Any]) -> None:
        self._db.execute("DELETE FROM scoped_terms WHERE rid = ? AND scope = (SELECT scope FROM scoped_docs WHERE rid = ?)", (rid, rid))
        self._db.execute("DELETE FROM scoped_docs WHERE rid = ?", (rid,))
        scope = meta.get(self.scope_field or "")
        if scope is None:
            return
        terms = Counter(index_terms(text))
        self._db.execute("INSERT INTO scoped_docs (rid, scope, len) VALUES (?, ?, ?)", (rid, str(scope), sum(terms.values())))
        self._db.executemany("INSERT INTO scoped_terms (scope, term, rid, tf) VALUES (?, ?, ?, ?)", [(str(scope), t, rid, n) for t, n in terms.items()])

    def _delete_scoped(self, rid: int) -> None:
        if self.scope_field is None:
            return
        self._db.execute("DELETE FROM scoped_terms WHERE rid = ? AND scope = (SELECT scope FROM scoped_docs WHERE rid = ?)", (rid, rid))
        self._db.execute("DELETE FROM scoped_docs WHERE rid = ?", (rid,))

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
                    if self.scope_field is not None:
                        self._add_scoped(rid, text, meta)
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
                self._delete_scoped(rid)
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
        scope = (where or {}).get(self.scope_field or "")
        if scope is not None and not isinstance(scope, (list, tuple, set)):
            return self.scoped_search(index_terms(query), k, where or {})
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

    def scoped_search(
        self, terms: Sequence[str], k: int, where: Mapping[str, Any], weights: Mapping[str, float] | None = None, b: float = BM25_B
    ) -> list[LexicalHit]:
        """BM25 with the statistics of one scope (``where[scope_field]``); `weights` scale each term's IDF;
        `b` is the length normalisation (0: none, 1: full)."""
        scope = str(where[self.scope_field or ""])
        unique = list(dict.fromkeys(terms))
        if not unique:
            return []
        rest = {f: v for f, v in where.items() if f != self.scope_field}
        with self._lock:
            total, avg_len = self._db.execute("SELECT COUNT(*), AVG(len) FROM scoped_docs WHERE scope = ?", (scope,)).fetchone()
            if not total:
                return []
            marks = ",".join("?" * len(unique))
            postings = self._db.execute(
                f"SELECT scoped_terms.term, scoped_terms.rid, scoped_terms.tf, scoped_docs.len FROM scoped_terms "
                f"JOIN scoped_docs ON scoped_docs.rid = scoped_terms.rid WHERE scoped_terms.scope = ? AND scoped_terms.term IN ({marks})",
                [scope, *unique],
            ).fetchall()
            df = Counter(term for term, *_ in postings)
            scores: dict[int, float] = {}
            for term, rid, tf, length in postings:
                idf = math.log(1 + (total - df[term] + 0.5) / (df[term] + 0.5)) * (weights.get(term, 1.0) if weights else 1.0)
                norm = tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - b + b * length / max(avg_len or 1.0, 1e-9)))
                scores[rid] = scores.get(rid, 0.0) + idf * norm
            ranked = sorted(scores.items(), key=lambda x: (-x[1], x[0]))
            hits: list[LexicalHit] = []
            for start in range(0, len(ranked), 500):
                part = ranked[start : start + 500]
                clause, args = self._where(rest)
                rows = self._db.execute(
                    f"SELECT rid, id, meta FROM docs WHERE rid IN ({','.join('?' * len(part))}) AND {clause}", [r for r, _ in part] + args
                ).fetchall()
                found = {r[0]: (r[1], r[2]) for r in rows}
                for rid, score in part:
                    if rid in found and len(hits) < k:
                        hits.append(LexicalHit(found[rid][0], score, json.loads(found[rid][1])))
                if len(hits) >= k:
                    break
        return hits[:k]

    def document_frequency(self, terms: Sequence[str], scope: str) -> tuple[dict[str, int], int]:
        """How many of one scope's documents hold each (stemmed) term, and how many documents it has."""
        if self.scope_field is None:
            raise ValueError("document_frequency needs an index opened with scope_field")
        unique = list(dict.fromkeys(terms))
        with self._lock:
            total = int(self._db.execute("SELECT COUNT(*) FROM scoped_docs WHERE scope = ?", (scope,)).fetchone()[0])
            if not unique:
                return {}, total
            rows = self._db.execute(
                f"SELECT term, COUNT(*) FROM scoped_terms WHERE scope = ? AND term IN ({','.join('?' * len(unique))}) GROUP BY term",
                [scope, *unique],
            ).fetchall()
        found = {t: int(n) for t, n in rows}
        return {t: found.get(t, 0) for t in unique}, total

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM fts")
            self._db.execute("DELETE FROM docs")
            if self.scope_field is not None:
                self._db.execute("DELETE FROM scoped_terms")
                self._db.execute("DELETE FROM scoped_docs")

    def purge(self) -> None:
        """Make deletions reach the file: merge the full-text index (dropping deleted terms) and empty the WAL."""
        with self._lock:
            self._db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_lexical_index(settings: Settings, namespace: str, scope_field: str | None = None) -> LexicalIndex:
    if not re.match(r"^[A-Za-z0-9_-]+$", namespace):
        raise ValueError(f"namespace {namespace!r} may hold only letters, digits, '-' and '_'")
    return LexicalIndex(settings.home / "lexical" / f"{namespace}.sqlite", scope_field=scope_field)
