"""The episode log: sessions, episodes and lessons in one SQLite file (WAL), append-only for episodes.

Episodes are never edited, only added or (for privacy requests) deleted, so the log keeps the exact
chronology of what was tried and what happened. Lessons live here too because they are small,
rewritten by consolidation, and must survive a restart together with the episodes they cite.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hydrabrain.servers.memory.timeutil import from_ts, to_iso
from hydrabrain.shared.embeddings import TokenVectors

PIECE_CACHE_BYTES = 128 << 20  # decoded word-piece vectors kept in memory (about 7,000 turns)
KINDS = ("observation", "attempt", "outcome", "fact", "preference", "turn")


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    team: str | None
    task: str | None
    started_at: float
    ended_at: float | None


@dataclass(frozen=True)
class Episode:
    id: str
    user: str
    team: str | None
    session_id: str
    kind: str
    text: str
    at: float  # when it happened (event time)
    recorded_at: float  # when the server learned it (transaction time)
    fact_ids: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    speaker: str | None = None  # turns: who said it
    turn: int | None = None  # turns: position in its session, from 0
    dates: list[dict[str, Any]] = field(default_factory=list)  # turns: relative dates resolved against `at`

    def as_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.kind == "turn":
            extra = {"speaker": self.speaker, "turn": self.turn, "dates": [d["label"] for d in self.dates]}
        return {
            "memory_id": self.id,
            "session_id": self.session_id,
            "kind": self.kind,
            "text": self.text,
            "at": to_iso(from_ts(self.at)),
            "recorded_at": to_iso(from_ts(self.recorded_at)),
            "entities": list(self.entities),
            **extra,
        }


@dataclass
class Lesson:
    id: str
    user: str
    team: str | None
    polarity: str  # "dead_end" | "works" | "mixed"
    text: str
    evidence: list[str]
    failed: int
    worked: int
    created_at: float
    updated_at: float

    @property
    def support(self) -> int:
        return len(self.evidence)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, team TEXT, task TEXT,
    started_at REAL NOT NULL, ended_at REAL);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
CREATE TABLE IF NOT EXISTS episodes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, user TEXT NOT NULL, team TEXT,
    session_id TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, at REAL NOT NULL,
    recorded_at REAL NOT NULL, fact_ids TEXT NOT NULL DEFAULT '[]', entities TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS episodes_user ON episodes(user, kind, at);
CREATE INDEX IF NOT EXISTS episodes_session ON episodes(session_id);
CREATE TABLE IF NOT EXISTS lessons (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, team TEXT, polarity TEXT NOT NULL, text TEXT NOT NULL,
    evidence TEXT NOT NULL, failed INTEGER NOT NULL, worked INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS lessons_user ON lessons(user);
CREATE TABLE IF NOT EXISTS turn_tokens (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, ids BLOB NOT NULL, vecs BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS turn_tokens_user ON turn_tokens(user);
CREATE TABLE IF NOT EXISTS token_df (
    user TEXT NOT NULL, token INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (user, token)) WITHOUT ROWID;
"""
# Columns added after the first release; a log written before gets them on open.
_ADDED_COLUMNS = {"speaker": "TEXT", "turn": "INTEGER", "dates": "TEXT NOT NULL DEFAULT '[]'"}


def _list(column: str) -> list:
    # Most turns carry no facts, names or dates; a recall reads hundreds of rows, so skip the parser for "[]".
    return [] if column == "[]" else json.loads(column)


def _episode(row: sqlite3.Row) -> Episode:
    return Episode(
        row["id"], row["user"], row["team"], row["session_id"], row["kind"], row["text"], row["at"],
        row["recorded_at"], _list(row["fact_ids"]), _list(row["entities"]),
        row["speaker"], row["turn"], _list(row["dates"]),
    )


def _lesson(row: sqlite3.Row) -> Lesson:
    return Lesson(
        row["id"], row["user"], row["team"], row["polarity"], row["text"], json.loads(row["evidence"]),
        row["failed"], row["worked"], row["created_at"], row["updated_at"],
    )


class EpisodeLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._pieces: OrderedDict[str, TokenVectors] = OrderedDict()
        self._pieces_bytes = 0
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # forget must not leave text in free pages
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(episodes)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE episodes ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS episodes_turn ON episodes(session_id, turn)")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- sessions ---------------------------------------------------------------------------

    def add_session(self, session: Session) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO sessions (id, user, team, task, started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, session.user, session.team, session.task, session.started_at, session.ended_at),
            )

    def session(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return None
        return Session(row["id"], row["user"], row["team"], row["task"], row["started_at"], row["ended_at"])

    def end_session(self, session_id: str, at: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE sessions SET ended_at = ? WHERE id = ? AND ended_at IS NULL", (at, session_id))

    def sessions(self, user: str) -> list[Session]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions WHERE user = ? ORDER BY started_at", (user,)).fetchall()
        return [Session(r["id"], r["user"], r["team"], r["task"], r["started_at"], r["ended_at"]) for r in rows]

    # --- episodes ---------------------------------------------------------------------------

    def add_episodes(self, episodes: Sequence[Episode], tokens: Mapping[str, TokenVectors] | None = None) -> None:
        """Store episodes; `tokens` (episode id -> its word-piece vectors) feed the late-interaction channel
        and are written in the same transaction, with the user's piece counts."""
        with self.transaction() as db:
            if tokens:
                users = {e.id: e.user for e in episodes}
                db.executemany(
                    "INSERT INTO turn_tokens (id, user, ids, vecs) VALUES (?, ?, ?, ?)",
                    [(i, users[i], t.ids.astype("<i4").tobytes(), t.vecs.astype("<f2").tobytes()) for i, t in tokens.items()],
                )
                self._count_pieces(db, [(users[i], t.ids) for i, t in tokens.items()], +1)
            db.executemany(
                "INSERT INTO episodes (id, user, team, session_id, kind, text, at, recorded_at, fact_ids, entities, speaker, turn, dates) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (e.id, e.user, e.team, e.session_id, e.kind, e.text, e.at, e.recorded_at, json.dumps(e.fact_ids), json.dumps(e.entities),
                     e.speaker, e.turn, json.dumps(e.dates))
                    for e in episodes
                ],
            )

    def episodes(
        self,
        user: str | None = None,
        ids: Sequence[str] | None = None,
        session_id: str | None = None,
        kinds: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[Episode]:
        sql, args = "SELECT * FROM episodes WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            args.append(user)
        if session_id is not None:
            sql += " AND session_id = ?"
            args.append(session_id)
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        if ids is not None:
            if not ids:
                return []
            found: list[Episode] = []
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                with self._lock:
                    rows = self._db.execute(sql + f" AND id IN ({','.join('?' * len(part))})", args + part).fetchall()
                found += [_episode(r) for r in rows]
            return sorted(found, key=lambda e: (e.at, e.recorded_at))
        sql += " ORDER BY at, seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_episode(r) for r in rows]

    def turns_at(self, positions: Sequence[tuple[str, int]]) -> list[Episode]:
        """The turns at these (session_id, position) places, where they exist."""
        found: list[Episode] = []
        with self._lock:
            for start in range(0, len(positions), 200):
                part = positions[start : start + 200]
                clause = " OR ".join("(session_id = ? AND turn = ?)" for _ in part)
                rows = self._db.execute(f"SELECT * FROM episodes WHERE kind = 'turn' AND ({clause})", [x for p in part for x in p]).fetchall()
                found += [_episode(r) for r in rows]
        return found

    def last_turn(self, session_id: str) -> Episode | None:
        """The latest turn stored in a session, if any."""
        with self._lock:
            row = self._db.execute("SELECT * FROM episodes WHERE session_id = ? AND kind = 'turn' ORDER BY turn DESC LIMIT 1", (session_id,)).fetchone()
        return _episode(row) if row else None

    def next_turn(self, session_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(turn) FROM episodes WHERE session_id = ?", (session_id,)).fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def speakers(self, user: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT speaker FROM episodes WHERE user = ? AND speaker IS NOT NULL", (user,)).fetchall()
        return [r[0] for r in rows]

    def episode_ids_mentioning(self, user: str, needle: str) -> list[str]:
        """Episodes whose text contains `needle` (case-insensitive) — candidates for a privacy request."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM episodes WHERE user = ? AND instr(lower(text), lower(?)) > 0", (user, needle)
            ).fetchall()
        return [r["id"] for r in rows]

    def delete_episodes(self, ids: Sequence[str]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM episodes WHERE id = ?", [(i,) for i in ids])
            gone = []
            for start in range(0, len(ids), 500):
                part = list(ids[start : start + 500])
                gone += db.execute(f"SELECT user, ids FROM turn_tokens WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
            if gone:
                self._count_pieces(db, [(r["user"], np.frombuffer(r["ids"], dtype="<i4")) for r in gone], -1)
                db.executemany("DELETE FROM turn_tokens WHERE id = ?", [(i,) for i in ids])
                self._forget_pieces(ids)

    # --- word-piece vectors (late interaction) -----------------------------------------------

    @staticmethod
    def _count_pieces(db: sqlite3.Connection, rows: Sequence[tuple[str, np.ndarray]], sign: int) -> None:
        """Add (or take away) each turn's distinct pieces to its user's document frequencies."""
        counts: Counter[tuple[str, int]] = Counter()
        for user, ids in rows:
            counts.update((user, int(t)) for t in set(ids.tolist()))
        db.executemany(
            "INSERT INTO token_df (user, token, n) VALUES (?, ?, ?) ON CONFLICT(user, token) DO UPDATE SET n = n + excluded.n",
            [(user, token, sign * n) for (user, token), n in counts.items()],
        )
        if sign < 0:
            db.execute("DELETE FROM token_df WHERE n <= 0")

    def turn_tokens(self, ids: Sequence[str]) -> dict[str, TokenVectors]:
        """The stored word-piece vectors of these turns (turns stored without them are absent).

        A recall reads a few hundred turns' pieces; the most recently read stay decoded in memory
        (up to `PIECE_CACHE_BYTES`), so repeated recalls over one conversation skip SQLite.
        """
        with self._lock:
            found = {i: self._pieces[i] for i in ids if i in self._pieces}
            for i in found:
                self._pieces.move_to_end(i)
            missing = [i for i in ids if i not in found]
            for start in range(0, len(missing), 500):
                part = missing[start : start + 500]
                for r in self._db.execute(f"SELECT id, ids, vecs FROM turn_tokens WHERE id IN ({','.join('?' * len(part))})", part):
                    pieces = np.frombuffer(r["ids"], dtype="<i4")
                    found[r["id"]] = self._pieces[r["id"]] = TokenVectors(pieces, np.frombuffer(r["vecs"], dtype="<f2").reshape(len(pieces), -1))
                    self._pieces_bytes += len(r["ids"]) + len(r["vecs"])
            while self._pieces_bytes > PIECE_CACHE_BYTES and self._pieces:
                _, old = self._pieces.popitem(last=False)
                self._pieces_bytes -= old.ids.nbytes + old.vecs.nbytes
        return found

    def _forget_pieces(self, ids: Sequence[str]) -> None:
        for i in ids:
            old = self._pieces.pop(i, None)
            if old is not None:
                self._pieces_bytes -= old.ids.nbytes + old.vecs.nbytes

    def piece_frequencies(self, user: str, pieces: Sequence[int]) -> tuple[dict[int, int], int]:
        """How many of this user's turns hold each piece, and how many turns have pieces at all: statistics
        scoped to one user, so nobody's recall depends on anyone else's data."""
        wanted = sorted({int(p) for p in pieces})
        with self._lock:
            total = int(self._db.execute("SELECT COUNT(*) FROM turn_tokens WHERE user = ?", (user,)).fetchone()[0])
            if not wanted:
                return {}, total
            rows = self._db.execute(
                f"SELECT token, n FROM token_df WHERE user = ? AND token IN ({','.join('?' * len(wanted))})", [user, *wanted]
            ).fetchall()
        return {int(r["token"]): int(r["n"]) for r in rows}, total

    def count(self, user: str | None = None) -> int:
        with self._lock:
            if user is None:
                return int(self._db.execute("SELECT COUNT(*) FROM episodes").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM episodes WHERE user = ?", (user,)).fetchone()[0])

    # --- lessons ----------------------------------------------------------------------------

    def lessons(self, user: str, ids: Sequence[str] | None = None) -> list[Lesson]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM lessons WHERE user = ? ORDER BY created_at, id", (user,)).fetchall()
        lessons = [_lesson(r) for r in rows]
        if ids is not None:
            wanted = set(ids)
            lessons = [lesson for lesson in lessons if lesson.id in wanted]
        return lessons

    def save_lessons(self, lessons: Sequence[Lesson], delete: Sequence[str] = ()) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM lessons WHERE id = ?", [(i,) for i in delete])
            db.executemany(
                "INSERT INTO lessons (id, user, team, polarity, text, evidence, failed, worked, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET polarity = excluded.polarity, "
                "text = excluded.text, evidence = excluded.evidence, failed = excluded.failed, worked = excluded.worked, "
                "updated_at = excluded.updated_at",
                [
                    (x.id, x.user, x.team, x.polarity, x.text, json.dumps(x.evidence), x.failed, x.worked, x.created_at, x.updated_at)
                    for x in lessons
                ],
            )

    def delete_user(self, user: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM episodes WHERE user = ?", (user,))
            self._forget_pieces([r["id"] for r in db.execute("SELECT id FROM turn_tokens WHERE user = ?", (user,))])
            db.execute("DELETE FROM turn_tokens WHERE user = ?", (user,))
            db.execute("DELETE FROM token_df WHERE user = ?", (user,))
            db.execute("DELETE FROM lessons WHERE user = ?", (user,))
            db.execute("DELETE FROM sessions WHERE user = ?", (user,))

    def purge(self) -> None:
        """Empty the WAL, so deleted rows survive in no file (secure_delete already zeroes their pages)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
