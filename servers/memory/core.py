"""The memory service: write, consolidate, recall and apply, over three stores.

- the episode log (SQLite, append-only) keeps what happened, in order;
- the fact graph (shared graph store) keeps what is true, and what was true when;
- lessons (SQLite) keep what many attempts taught, with the episodes as evidence.

Episodes, facts and lessons are also indexed for hybrid recall (vector collection ``memory`` and
lexical namespace ``memory``), every item tagged with its user, so one user's memories never reach
another's results. Every public method checks its input completely before it writes anything.
"""

from __future__ import annotations

import functools
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hydrabrain.servers.memory import lessons as lesson_logic
from hydrabrain.servers.memory.episodes import KINDS, Episode, EpisodeLog, Lesson, Session
from hydrabrain.servers.memory.facts import Fact, FactFormatError, FactGraph, FactInput, entity_id, key, parse_facts
from hydrabrain.servers.memory.recall import RankingWeights, Support, entity_mentions, recency, support, term_weights, weighted_coverage
from hydrabrain.servers.memory.timeutil import TimeFormatError, now, parse_time, to_iso
from hydrabrain.servers.memory.turns import (
    MAX_SPEAKER_CHARS,
    MAX_TURNS_PER_CALL,
    TurnInput,
    TurnScoring,
    TurnSignals,
    content_pieces,
    content_terms,
    embedding_text,
    indexed_text,
    late_interaction,
    late_share,
    named_speakers,
    names_in,
    rank_turns,
    resolve_dates,
    turn_vectors,
    without_speakers,
)
from hydrabrain.shared.config import Settings
from hydrabrain.shared.embeddings import Embedder, TokenVectors, get_embedder
from hydrabrain.shared.graph import open_graph_store
from hydrabrain.shared.lexical import open_lexical_index
from hydrabrain.shared.retrieval import RRF_K, HybridRetriever, RetrievalHit, RetrievalWeights
from hydrabrain.shared.telemetry import get_logger, log_event
from hydrabrain.shared.vectors import open_vector_store

log = get_logger("memory")
FACT_ITEM = "triple"  # index kind of a graph fact
LESSON_ITEM = "lesson"
ITEM_KINDS = (*KINDS, FACT_ITEM, LESSON_ITEM)
_NAME = re.compile(r"^[\w.@:+-]{1,128}$")
MAX_FACTS_PER_CALL = 50


def _matches_where(e: Episode, where: dict[str, Any]) -> bool:
    kinds = where.get("kind")
    if kinds is not None and e.kind not in (kinds if isinstance(kinds, list) else [kinds]):
        return False
    return all(getattr(e, "session_id") == v for f, v in where.items() if f == "session_id")


class MemoryInputError(ValueError):
    """Input the memory server refuses; the message says what to change."""


class UnknownSession(MemoryInputError):
    """No such session (or it belongs to someone else)."""


@dataclass
class RecallItem:
    type: str  # "episode" | "fact" | "lesson"
    id: str
    text: str
    score: float
    kind: str | None = None
    at: str | None = None
    session_id: str | None = None
    source_memory_ids: list[str] = field(default_factory=list)
    fact: dict[str, Any] | None = None
    signals: dict[str, float] = field(default_factory=dict)
    speaker: str | None = None
    dates: list[str] = field(default_factory=list)  # relative dates in a turn, resolved ("yesterday" -> "7 May 2023")
    superseded_by: str | None = None  # memory_id stating what is true now, when all of this episode's facts were superseded
    current: list[str] = field(default_factory=list)  # the current value(s) that superseded it


@dataclass
class TurnsResult:
    session_id: str
    memory_ids: list[str]
    dates_resolved: int
    names_linked: int


@dataclass
class RememberResult:
    memory_id: str
    at: str
    facts: list[Fact]
    invalidated: list[Fact]


@dataclass
class ConsolidationResult:
    created: list[Lesson]
    updated: list[Lesson]
    episodes_considered: int


@dataclass
class Briefing:
    text: str
    tokens: int
    token_budget: int
    lessons: int
    facts: int
    preferences: int
    omitted: int


@dataclass
class ForgetResult:
    episodes: int
    facts: int
    lessons_deleted: int
    lessons_rewritten: int


def check_user(user: object, field_name: str = "user") -> str:
    if not isinstance(user, str) or not _NAME.match(user):
        raise MemoryInputError(f"{field_name} must be 1-128 characters of letters, digits or . _ @ : + -; got {user!r}")
    return user


def check_time(value: str | float | None, field_name: str) -> float | None:
    try:
        return parse_time(value, field_name)
    except TimeFormatError as exc:
        raise MemoryInputError(str(exc)) from None


class MemoryService:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.cfg = settings.memory
        self.embedder = embedder or get_embedder(settings)
        self.log = EpisodeLog(settings.data_dir("memory") / "episodes.sqlite")
        self.vectors = open_vector_store(settings, "memory", dim=self.embedder.dim, indexed=("user", "kind", "session_id"))
        # BM25 statistics per user: another user's writes never reorder this user's results.
        self.lexical = open_lexical_index(settings, "memory", scope_field="user")
        self.graph = FactGraph(open_graph_store(settings, "memory"))
        self.weights = RankingWeights(speaker_share=self.cfg.speaker_share, late_share=self.cfg.late_share)
        self.conversation = TurnScoring()
        # A query's word pieces, kept for queries asked again: the pooled vector has the embedder's cache,
        # and without this one a repeated recall would run the encoder again just for the pieces.
        self._query_pieces = functools.lru_cache(maxsize=1024)(lambda query: self.embedder.embed_with_tokens([query])[1][0])
        self._user_for_neighbours: str | None = None
        self.retriever = HybridRetriever(self.embedder, self.vectors, self.lexical, neighbours=self._neighbours, weights=RetrievalWeights(graph=0.3))
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            flush = getattr(self.vectors, "flush", None)
            if flush:
                flush()
            self.vectors.close()
            self.lexical.close()
            self.log.close()
            self.graph.store.close()

    def _neighbours(self, ids: list[str]) -> dict[str, int]:
        episodes = [i for i in ids if i.startswith("mem_")]
        if not episodes or self._user_for_neighbours is None:
            return {}
        return self.graph.neighbours(self._user_for_neighbours, episodes)

    # --- sessions ---------------------------------------------------------------------------

    def start_session(self, user: str, task: str | None = None, team: str | None = None) -> Session:
        check_user(user)
        if team is not None:
            check_user(team, "team")
        if task is not None and len(task) > self.cfg.max_text_chars:
            raise MemoryInputError(f"task is {len(task)} characters; the limit is {self.cfg.max_text_chars}")
        session = Session(f"ses_{uuid.uuid4().hex[:16]}", user, team, task, now(), None)
        self.log.add_session(session)
        log_event(log, "session started", session_id=session.id, user=user)
        return session

    def session(self, session_id: str, user: str | None = None) -> Session:
        session = self.log.session(session_id) if isinstance(session_id, str) else None
        if session is None or (user is not None and session.user != user):
            raise UnknownSession(f"no session {session_id!r}; call start_session(user) first and pass the session_id it returns")
        return session

    def end_session(self, session_id: str) -> tuple[Session, ConsolidationResult]:
        with self._lock:
            session = self.session(session_id)
            if session.ended_at is None:
                self.log.end_session(session_id, now())
            result = self.consolidate(session.user, session_id=session_id)
            return self.session(session_id), result

    # --- writing ----------------------------------------------------------------------------

    def remember(
        self,
        session_id: str,
        text: str,
        kind: str = "observation",
        facts: Iterable[object] | None = None,
        at: str | float | None = None,
    ) -> RememberResult:
        session = self.session(session_id)
        if session.ended_at is not None:
            raise MemoryInputError(f"session {session_id} has ended; start a new session to remember more")
        if kind not in KINDS:
            raise MemoryInputError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(text, str) or not text.strip():
            raise MemoryInputError("text is empty; say what was observed, tried or decided")
        if len(text) > self.cfg.max_text_chars:
            raise MemoryInputError(
                f"text is {len(text)} characters; the limit is {self.cfg.max_text_chars} (memory.max_text_chars). "
                "Store a summary, or split it into several memories"
            )
        try:
            parsed = parse_facts(facts)
        except FactFormatError as exc:
            raise MemoryInputError(str(exc)) from None
        if len(parsed) > MAX_FACTS_PER_CALL:
            raise MemoryInputError(f"{len(parsed)} facts in one call; the limit is {MAX_FACTS_PER_CALL}")
        at_ts = check_time(at, "at")
        recorded = now()
        at_ts = recorded if at_ts is None else at_ts
        # One forward pass for the text and its facts; _write finds the fact vectors in the cache.
        vector = self.embedder.embed([text, *(f"{f.subject} {f.predicate} {f.object}" for f in parsed)])[:1]
        return self._write(session, text, kind, parsed, at_ts, recorded, vector)

    def _write(self, session: Session, text: str, kind: str, facts: list[FactInput], at_ts: float, recorded: float, vector: np.ndarray | None) -> RememberResult:
        memory_id = f"mem_{uuid.uuid4().hex[:16]}"
        with self._lock:
            try:
                stored: list[Fact] = []
                invalidated: list[Fact] = []
                for fact in facts:
                    before = {f.id: f for f in self.graph.facts(session.user, as_of=at_ts) if key(f.subject) == key(fact.subject) and key(f.predicate) == key(fact.predicate)}
                    saved, is_new = self.graph.assert_fact(session.user, fact, at_ts, recorded, memory_id)
                    stored.append(saved)
                    if is_new:
                        current = self.graph.get(session.user, list(before))
                        invalidated += [f for f in current.values() if not f.valid_at(at_ts)]
                entities = list(dict.fromkeys(n for f in facts for n in (f.subject, f.object)))
                self.graph.add_episode(session.user, memory_id, entities)
                episode = Episode(memory_id, session.user, session.team, session.id, kind, text, at_ts, recorded, [f.id for f in stored if f.source == memory_id], entities)
                self.log.add_episodes([episode])
                items = [(memory_id, text, self._payload(session, kind, at_ts))]
                new_facts = [f for f in stored if f.source == memory_id]
                items += [(f"fact:{f.id}", f.text, {**self._payload(session, FACT_ITEM, at_ts), "fact_id": f.id}) for f in new_facts]
                vectors = vector if not new_facts else np.concatenate([vector, self.embedder.embed([f.text for f in new_facts])])
                self.retriever.index(items, vectors=vectors)
            except Exception:
                # Nothing half-way: undo whatever part of this memory reached a store.
                self._erase([memory_id], session.user)
                raise
        log_event(log, "remembered", memory_id=memory_id, user=session.user, kind=kind, facts=len(stored))
        return RememberResult(memory_id, to_iso(at_ts) or "", stored, invalidated)

    @staticmethod
    def _payload(session: Session, kind: str, at_ts: float) -> dict[str, Any]:
        payload: dict[str, Any] = {"user": session.user, "kind": kind, "session_id": session.id, "at": at_ts}
        if session.team:
            payload["team"] = session.team
        return payload

    def bulk_remember(self, session: Session, records: Sequence[tuple[str, str, float]], vectors: np.ndarray | None = None, entities: Sequence[Sequence[str]] | None = None) -> list[str]:
        """Append many (text, kind, at) episodes without facts in one go (imports, load tests)."""
        recorded = now()
        ids = [f"mem_{uuid.uuid4().hex[:16]}" for _ in records]
        episodes = [
            Episode(i, session.user, session.team, session.id, kind, text, at, recorded, [], list(entities[n]) if entities else [])
            for n, (i, (text, kind, at)) in enumerate(zip(ids, records, strict=True))
        ]
        with self._lock:
            self.log.add_episodes(episodes)
            if entities:
                for episode in episodes:
                    if episode.entities:
                        self.graph.add_episode(session.user, episode.id, episode.entities)
            self.retriever.index([(e.id, e.text, self._payload(session, e.kind, e.at)) for e in episodes], vectors=vectors)
        return ids

    def parse_turns(self, turns: object) -> list[TurnInput]:
        """Every turn checked before any is stored; the message names the first bad one."""
        if not isinstance(turns, (list, tuple)) or not turns:
            raise MemoryInputError("turns must be a non-empty list of {speaker, text, at?} objects")
        if len(turns) > MAX_TURNS_PER_CALL:
            raise MemoryInputError(f"{len(turns)} turns in one call; the limit is {MAX_TURNS_PER_CALL}: send the conversation in parts")
        parsed: list[TurnInput] = []
        for n, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise MemoryInputError(f"turns[{n}] must be an object with speaker and text; got {type(turn).__name__}")
            unknown = set(turn) - {"speaker", "text", "at"}
            if unknown:
                raise MemoryInputError(f"turns[{n}] has unknown fields {sorted(unknown)}; a turn is {{speaker, text, at?}}")
            speaker, text = turn.get("speaker"), turn.get("text")
            if not isinstance(speaker, str) or not speaker.strip() or len(speaker) > MAX_SPEAKER_CHARS:
                raise MemoryInputError(f"turns[{n}].speaker must be a name of 1-{MAX_SPEAKER_CHARS} characters; got {speaker!r}")
            if not isinstance(text, str) or not text.strip():
                raise MemoryInputError(f"turns[{n}].text is empty; send what the speaker said")
            if len(text) > self.cfg.max_text_chars:
                raise MemoryInputError(f"turns[{n}].text is {len(text)} characters; the limit is {self.cfg.max_text_chars} (memory.max_text_chars)")
            parsed.append(TurnInput(speaker.strip(), text.strip(), check_time(turn.get("at"), f"turns[{n}].at")))
        return parsed

    def remember_turns(self, session_id: str, turns: object) -> TurnsResult:
        """Store a conversation's turns in order, in one batch: one embedding pass, one write per store."""
        session = self.session(session_id)
        if session.ended_at is not None:
            raise MemoryInputError(f"session {session_id} has ended; start a new session to remember more")
        parsed = self.parse_turns(turns)
        recorded = now()
        speakers = frozenset(t.speaker.casefold() for t in parsed)
        rows = []
        last_at = recorded
        for turn in parsed:
            at_ts = turn.at if turn.at is not None else last_at  # a turn without a time is said when the one before it was
            last_at = at_ts
            dates = resolve_dates(turn.text, at_ts)
            rows.append((turn, at_ts, dates, names_in(turn.text, speakers)))
        texts = [indexed_text(t.speaker, t.text, d) for t, _, d, _ in rows]
        vectors, pieces = self._turn_encoding(session.id, [(t.speaker, t.text) for t, _, _, _ in rows], texts)
        ids = [f"mem_{uuid.uuid4().hex[:16]}" for _ in rows]
        tokens = {i: content_pieces(tv, self.embedder.tokenizer) for i, tv in zip(ids, pieces, strict=True)}
        with self._lock:
            first = self.log.next_turn(session.id)
            episodes = [
                Episode(i, session.user, session.team, session.id, "turn", t.text, at_ts, recorded, [], names, t.speaker, first + n,
                        [{"phrase": d.phrase, "label": d.label, "start": d.start} for d in dates])
                for n, (i, (t, at_ts, dates, names)) in enumerate(zip(ids, rows, strict=True))
            ]
            try:
                self.log.add_episodes(episodes, {i: t for i, t in tokens.items() if len(t.ids)})
                self.graph.add_episodes(session.user, [(e.id, e.entities) for e in episodes if e.entities])
                self.retriever.index(
                    [(e.id, text, {**self._payload(session, "turn", e.at), "speaker": e.speaker, "turn": e.turn}) for e, text in zip(episodes, texts, strict=True)],
                    vectors=vectors,
                )
            except Exception:
                self._erase(ids, session.user)
                raise
        log_event(log, "remembered turns", user=session.user, session_id=session.id, turns=len(ids))
        return TurnsResult(session.id, ids, sum(len(r[2]) for r in rows), sum(len(r[3]) for r in rows))

    def _turn_encoding(self, session_id: str, said: list[tuple[str, str]], texts: list[str]) -> tuple[np.ndarray, list[TokenVectors]]:
        """Each turn's vector, read with the turn before it (from an earlier call too) so a reply carries its
        question, and the turn's own pieces for late interaction, from the same encoder pass."""
        last = self.log.last_turn(session_id)
        if self.cfg.turn_encoding == "single":  # one pass per turn; the pair's vector is composed (`turn_vectors`)
            before = [indexed_text(last.speaker or "", last.text, resolve_dates(last.text, last.at))] if last else []
            pieces = self.embedder.embed_with_tokens(texts + before)[1]
            return turn_vectors(pieces[: len(texts)], pieces[len(texts)] if last else None), pieces[: len(texts)]
        previous: list[tuple[str, str] | None] = [(last.speaker or "", last.text) if last else None, *said[:-1]]
        vectors, pieces = self.embedder.embed_with_tokens([embedding_text(p, text) for p, text in zip(previous, texts, strict=True)])
        # the turn's own pieces, read in the context of the turn before it
        return vectors, [tv.after(self.embedder.count_tokens(embedding_text(p, "")) if p else 0) for tv, p in zip(pieces, previous, strict=True)]

    # --- recall -----------------------------------------------------------------------------

    def recall(
        self,
        query: str,
        user: str,
        k: int = 8,
        as_of: str | float | None = None,
        kinds: Sequence[str] | None = None,
        session_id: str | None = None,
    ) -> list[RecallItem]:
        items, found = self.recall_with_support(query, user, k, as_of, kinds, session_id)
        if not found.answers(self.weights):
            return []  # nothing remembered is about this: say so rather than pad the list
        return items

    def recall_with_support(
        self,
        query: str,
        user: str,
        k: int = 8,
        as_of: str | float | None = None,
        kinds: Sequence[str] | None = None,
        session_id: str | None = None,
    ) -> tuple[list[RecallItem], Support]:
        """Recall without abstaining, and how strongly memory suggests it holds an answer at all."""
        check_user(user)
        if not isinstance(query, str) or not query.strip():
            raise MemoryInputError("query is empty; describe what you want to remember")
        if not 1 <= k <= 100:
            raise MemoryInputError(f"k={k} is out of range; ask for 1 to 100 items")
        bad = [x for x in kinds or () if x not in (*KINDS, "fact", "lesson")]
        if bad:
            raise MemoryInputError(f"unknown kinds {bad}; choose from {', '.join((*KINDS, 'fact', 'lesson'))}")
        as_of_ts = check_time(as_of, "as_of")
        if session_id is not None:
            self.session(session_id, user)
        index_kinds = [FACT_ITEM if x == "fact" else x for x in kinds] if kinds else list(ITEM_KINDS)
        where: dict[str, Any] = {"user": user, "kind": index_kinds}
        if session_id is not None:
            where["session_id"] = session_id
        # One encoder pass gives the query's pieces and its vector (cached, so the search below reuses it).
        query_pieces = self._query_pieces(query)
        with self._lock:
            self._user_for_neighbours = user
            try:
                hits = self.retriever.search(query, k=max(40, 5 * k), where=where, fetch_k=max(60, 8 * k))
            finally:
                self._user_for_neighbours = None
            shares, conversation = (1.0, 1.0), any(h.payload.get("kind") == "turn" for h in hits)
            if conversation:
                hits, shares = self._in_conversation(query, query_pieces, user, hits, where, limit=max(40, 5 * k))
            items, best = self._rank(query, user, hits, as_of_ts, k, allow_facts=not kinds or "fact" in kinds)
            return items, Support(best, shares[0], conversation, shares[1])

    def _in_conversation(self, query: str, query_pieces: TokenVectors, user: str, hits: list[RetrievalHit], where: dict[str, Any],
                         limit: int) -> tuple[list[RetrievalHit], tuple[float, float]]:
        """Rank the turns among the hits (and the turns the hybrid search missed) with `rank_turns`.

        Turns get their own candidates (dense and BM25, for the named speaker and for anyone, plus the
        turns around each), ranked in z-score units; that order is then laid onto the fused scale, turn
        r scoring as an item ranked r by both channels would, so notes, facts and lessons keep their place.
        Returns the best `limit` hits (as many as the hybrid search returns; the rest cannot reach the
        top k) and the named speaker's share of the best lexical match and of the best MaxSim (see
        `RankingWeights.speaker_share` and `late_share`).
        """
        w = self.conversation
        speakers = self.log.speakers(user)
        named = named_speakers(query, speakers)
        base = {**where, "kind": "turn"}
        scopes = [base, {**base, "speaker": sorted(named)}] if named else [base]
        qv = self.embedder.embed_one(query)
        terms = content_terms(without_speakers(query, speakers))
        found: dict[str, TurnSignals] = {}
        payloads: dict[str, dict[str, Any]] = {}

        def candidate(memory_id: str, payload: dict[str, Any]) -> TurnSignals:
            if memory_id not in found:
                found[memory_id] = TurnSignals(memory_id, str(payload.get("session_id")), int(payload.get("turn", 0)), str(payload.get("speaker") or ""))
                payloads[memory_id] = payload
            return found[memory_id]

        for scope in scopes:
            for v in self.vectors.search(qv, w.candidates, scope):
                candidate(v.id, v.payload).cosine = v.score
            if terms:
                for h in self.lexical.scoped_search(terms, w.candidates, scope, b=w.bm25_b):
                    candidate(h.id, h.meta).bm25 = h.score
        for hit in hits:
            if hit.payload.get("kind") == "turn" and "graph" in hit.signals:
                candidate(hit.id, hit.payload).graph = True
        around = [(t.session_id, t.turn + d) for t in list(found.values()) for d in (-1, 1)]
        for e in self.log.turns_at([p for p in dict.fromkeys(around) if p[1] >= 0]):
            if e.id not in found and _matches_where(e, where):
                candidate(e.id, {**self._payload_of(e), "text": indexed_text(e.speaker or "", e.text, [])})
        best_lexical = max((t.bm25 or 0.0 for t in found.values()), default=0.0)
        share = 1.0
        if named and best_lexical > 0:
            share = max((t.bm25 or 0.0 for t in found.values() if t.speaker in named), default=0.0) / best_lexical
        def late(ids: list[str]) -> dict[str, float]:
            return late_interaction(query_pieces, self.log.turn_tokens(ids), *self.log.piece_frequencies(user, query_pieces.ids.tolist()))

        scored = rank_turns(list(found.values()), named, w, late)
        ranked = sorted(scored, key=lambda i: scored[i]["score"], reverse=True)[:limit]
        keep = [h for h in hits if h.payload.get("kind") != "turn"]
        missing_text = [i for i in ranked if not payloads[i].get("text")]
        if missing_text:  # a lexical hit carries no text; the vector store's payload has it
            for memory_id, payload in self.vectors.get(missing_text).items():
                payloads[memory_id] = {**payloads[memory_id], "text": payload.get("text")}
        for r, memory_id in enumerate(ranked):
            t, parts = found[memory_id], scored[memory_id]
            signals = {name: round(value, 4) for name, value in parts.items()}
            if named and not parts["speaker"]:
                signals["other_speaker"] = 1.0  # said by someone the question does not ask about: no support for an answer
            if t.cosine is not None:
                signals["cosine"] = t.cosine
            if t.late is not None:
                signals["maxsim"] = round(t.late, 4)
            payload = {**payloads[memory_id]}
            keep.append(RetrievalHit(memory_id, 2.0 / (RRF_K + r + 1), str(payload.pop("text", "") or ""), payload, signals))
        keep.sort(key=lambda h: h.score, reverse=True)
        return keep[:limit], (share, late_share(list(found.values()), named))

    def _payload_of(self, e: Episode) -> dict[str, Any]:
        payload: dict[str, Any] = {"user": e.user, "kind": e.kind, "session_id": e.session_id, "at": e.at}
        if e.team:
            payload["team"] = e.team
        if e.kind == "turn":
            payload.update(speaker=e.speaker, turn=e.turn)
        return payload

    def _rank(self, query: str, user: str, hits: list, as_of_ts: float | None, k: int, allow_facts: bool = True) -> tuple[list[RecallItem], float]:
        w = self.weights
        ref = as_of_ts if as_of_ts is not None else now()
        episode_ids = [h.id for h in hits if h.id.startswith("mem_")]
        episodes = {e.id: e for e in self.log.episodes(user=user, ids=episode_ids)}
        fact_ids = [str(h.payload.get("fact_id")) for h in hits if h.id.startswith("fact:")]
        linked = {fid for e in episodes.values() for fid in e.fact_ids}
        facts = self.graph.get(user, [*fact_ids, *linked]) if (fact_ids or linked) else {}
        lessons = {x.id: x for x in self.log.lessons(user)} if any(h.id.startswith("les_") for h in hits) else {}
        named = entity_mentions(query, [n for _, n, _ in self.graph.entities(user)]) if fact_ids else set()
        idf = term_weights(self.lexical, query, user, max(1, self.log.count(user)))
        items: list[RecallItem] = []
        superseded: list[tuple[RecallItem, list[Fact]]] = []
        best_support = 0.0
        for hit in hits:
            score = hit.score
            signals = dict(hit.signals)
            cover = weighted_coverage(idf, hit.text)
            signals["weighted_coverage"] = round(cover, 3)
            cosine = hit.signals.get("cosine")
            if cosine is not None and cosine < w.min_cosine:
                continue
            at_ts = float(hit.payload.get("at", ref))
            if as_of_ts is not None and at_ts > as_of_ts:
                continue
            if hit.id.startswith("fact:"):
                fact = facts.get(str(hit.payload.get("fact_id")))
                if fact is None or not fact.valid_at(ref):
                    continue
                score += w.fact
                if named & {key(fact.subject), key(fact.object)}:
                    score += w.entity
                score += w.recency * recency(ref - fact.valid_from, self.cfg.recency_half_life_days)
                items.append(RecallItem("fact", fact.id, fact.text, score, "fact", to_iso(fact.valid_from), hit.payload.get("session_id"),
                                        [fact.source] if fact.source else [], fact.as_dict(), signals))
            elif hit.id.startswith("les_"):
                lesson = lessons.get(hit.id)
                if lesson is None or (as_of_ts is not None and lesson.created_at > as_of_ts):
                    continue
                score += w.lesson
                items.append(RecallItem("lesson", lesson.id, lesson.text, score, lesson.polarity, to_iso(lesson.updated_at), None, list(lesson.evidence), None, signals))
            else:
                episode = episodes.get(hit.id)
                if episode is None:
                    continue
                own = [facts[f] for f in episode.fact_ids if f in facts]
                newer: list[Fact] = []
                if own and not any(f.valid_at(ref) for f in own):
                    score *= w.stale
                    signals["stale"] = 1.0
                    newer = self._superseding(user, own, ref)
                score += w.recency * recency(ref - episode.at, self.cfg.recency_half_life_days)
                item = RecallItem("episode", episode.id, episode.text, score, episode.kind, to_iso(episode.at), episode.session_id, [episode.id], None, signals,
                                  episode.speaker, [d["label"] for d in episode.dates])
                if signals.get("stale"):
                    item.superseded_by = next((f.source for f in sorted(newer, key=lambda f: -f.valid_from) if f.source), None)
                    item.current = [f.text for f in newer]
                    superseded.append((item, newer))
                items.append(item)
            if not signals.get("other_speaker"):
                best_support = max(best_support, support(cosine, cover, w))
        self._below_current(items, superseded, allow_facts)
        items.sort(key=lambda item: item.score, reverse=True)
        return items[:k], best_support

    def _superseding(self, user: str, old: Sequence[Fact], ref: float) -> list[Fact]:
        """The facts true at `ref` for the subjects and predicates of these superseded ones."""
        wanted = {(key(f.subject), key(f.predicate)) for f in old}
        return [f for f in self.graph.facts(user, as_of=ref) if (key(f.subject), key(f.predicate)) in wanted]

    def _below_current(self, items: list[RecallItem], superseded: list[tuple[RecallItem, list[Fact]]], allow_facts: bool) -> None:
        """A superseded episode ranks below the evidence of what is true now; that evidence joins the list if missing."""
        if not superseded:
            return
        present = {i.id: i for i in items}
        for item, newer in superseded:
            evidence: list[RecallItem] = []
            for fact in newer:
                current = present.get(fact.id)
                if current is None and allow_facts:
                    current = RecallItem("fact", fact.id, fact.text, item.score, "fact", to_iso(fact.valid_from), None,
                                         [fact.source] if fact.source else [], fact.as_dict(), {"supersedes": 1.0})
                    items.append(current)
                    present[fact.id] = current
                if current is not None:
                    evidence.append(current)
                if fact.source and fact.source in present:
                    evidence.append(present[fact.source])
            if evidence:
                floor = min(e.score for e in evidence)
                if item.score >= floor:
                    item.score = floor - 1e-6

    def naive_recall(self, query: str, user: str, k: int = 5) -> list[RecallItem]:
        """Dense top-k over raw episode text: the anchor recall is measured against."""
        hits = self.retriever.dense_only(query, k, where={"user": user, "kind": list(KINDS)})
        return [RecallItem("episode", h.id, h.text, h.score, h.payload.get("kind"), None, h.payload.get("session_id"), [h.id]) for h in hits]

    # --- consolidation ----------------------------------------------------------------------

    def consolidate(self, user: str, session_id: str | None = None) -> ConsolidationResult:
        check_user(user)
        with self._lock:
            team = None
            if session_id is not None:
                team = self.session(session_id, user).team
            episodes = self.log.episodes(user=user, session_id=session_id, kinds=("attempt", "outcome"))
            existing = self.log.lessons(user)
            if not episodes:
                return ConsolidationResult([], [], 0)
            vectors = self.embedder.embed([e.text for e in episodes])
            if session_id is not None:
                # A dead end met once per session is still a dead end: bring in its look-alikes from other sessions.
                episodes = episodes + self._look_alikes(user, episodes, vectors)
                vectors = self.embedder.embed([e.text for e in episodes])
            lesson_vectors = self._lesson_vectors(user, existing)
            created, updated = lesson_logic.consolidate(
                user, team, episodes, vectors, existing, lesson_vectors,
                all_episodes=lambda ids: self.log.episodes(user=user, ids=ids),
                threshold=self.cfg.lesson_similarity, min_support=self.cfg.lesson_min_support, now=now(),
                embed=lambda texts: self.embedder.embed(texts),
            )
            changed = [*created, *updated]
            if changed:
                self.log.save_lessons(changed)
                self._index_lessons(changed)
            log_event(log, "consolidated", user=user, session_id=session_id, created=len(created), updated=len(updated))
            return ConsolidationResult(created, updated, len(episodes))

    def _look_alikes(self, user: str, episodes: Sequence[Episode], vectors: np.ndarray, per_episode: int = 20) -> list[Episode]:
        """Attempts and outcomes from other sessions close enough to join these episodes' lessons."""
        have = {e.id for e in episodes}
        found: list[str] = []
        for vector in vectors:
            for hit in self.vectors.search(vector, per_episode, where={"user": user, "kind": ["attempt", "outcome"]}):
                if hit.score >= self.cfg.lesson_similarity and hit.id not in have:
                    have.add(hit.id)
                    found.append(hit.id)
        return self.log.episodes(user=user, ids=found)

    def _lesson_vectors(self, user: str, lessons: Sequence[Lesson]) -> np.ndarray:
        """Each lesson as the centroid of its evidence, so merging compares like with like."""
        rows = []
        for lesson in lessons:
            texts = [e.text for e in self.log.episodes(user=user, ids=lesson.evidence)] or [lesson.text]
            c = self.embedder.embed(texts).mean(axis=0)
            rows.append(c / max(float(np.linalg.norm(c)), 1e-9))
        return np.stack(rows) if rows else np.zeros((0, self.embedder.dim), dtype=np.float32)

    def _index_lessons(self, lessons: Sequence[Lesson]) -> None:
        items = [(x.id, x.text, {"user": x.user, "kind": LESSON_ITEM, "at": x.updated_at, **({"team": x.team} if x.team else {})}) for x in lessons]
        self.retriever.index(items)

    def lessons(self, user: str) -> list[Lesson]:
        check_user(user)
        return sorted(self.log.lessons(user), key=lambda x: (-x.support, x.created_at))

    # --- briefing ---------------------------------------------------------------------------

    def briefing(self, task: str, user: str, token_budget: int = 800) -> Briefing:
        check_user(user)
        if not isinstance(task, str) or not task.strip():
            raise MemoryInputError("task is empty; describe what you are about to do")
        if not 20 <= token_budget <= 32_000:
            raise MemoryInputError(f"token_budget={token_budget} is out of range; use 20 to 32000 tokens")
        hits = self.recall(task, user, k=30)
        lesson_hits = [h for h in hits if h.type == "lesson"]
        fact_hits = [h for h in hits if h.type == "fact"]
        known = {h.id for h in fact_hits}
        # Current facts about what the task names come next, even if ranked low.
        named = entity_mentions(task, [n for _, n, _ in self.graph.entities(user)])
        for fact in self.graph.facts(user):
            if fact.id not in known and named & {key(fact.subject), key(fact.object)}:
                fact_hits.append(RecallItem("fact", fact.id, fact.text, 0.0, "fact", to_iso(fact.valid_from), None, [fact.source] if fact.source else [], fact.as_dict()))
        preferences = [e for e in self.log.episodes(user=user, kinds=("preference",))]
        pref_rank = {h.id: n for n, h in enumerate(hits)}
        preferences.sort(key=lambda e: (pref_rank.get(e.id, len(hits)), -e.at))
        # Dead ends first: they save the most time.
        order = {"dead_end": 0, "mixed": 1, "works": 2}
        lesson_hits.sort(key=lambda h: (order.get(h.kind or "", 3), -h.score))
        sections = [
            ("Lessons (skip the dead ends)", [f"- {h.text} [evidence: {len(h.source_memory_ids)} episodes]" for h in lesson_hits]),
            ("Current facts", [f"- {h.fact['subject']} {h.fact['predicate']} {h.fact['object']} (since {h.fact['valid_from'][:10]})" for h in fact_hits if h.fact]),
            ("Preferences", [self._preference_line(user, e) for e in preferences]),
        ]
        count = self.embedder.count_tokens
        header = f"Before you start: {task.strip()}"
        text = header
        used = count(text)
        included = {title: 0 for title, _ in sections}
        omitted = 0
        for title, lines in sections:
            if not lines:
                continue
            block_head = f"\n\n## {title}"
            if used + count(block_head) + count("\n" + lines[0]) > token_budget:
                omitted += len(lines)
                continue
            text += block_head
            for line in lines:
                candidate = text + "\n" + line
                tokens = count(candidate)
                if tokens > token_budget:
                    omitted += 1
                    continue
                text, used = candidate, tokens
                included[title] += 1
            used = count(text)
        if not any(included.values()):
            text += "\n\nNothing remembered applies to this task yet."
            if count(text) > token_budget:
                text = header
        tokens = count(text)
        return Briefing(text, tokens, token_budget, included[sections[0][0]], included[sections[1][0]], included[sections[2][0]], omitted)

    def _preference_line(self, user: str, episode: Episode) -> str:
        own = list(self.graph.get(user, episode.fact_ids).values()) if episode.fact_ids else []
        if own and not any(f.current for f in own):
            newer = self._superseding(user, own, now())
            if newer:
                return f"- {episode.text} (superseded; now: {'; '.join(f.text for f in newer)})"
        return f"- {episode.text}"

    # --- reading ----------------------------------------------------------------------------

    def facts(self, user: str, as_of: str | float | None = None, include_history: bool = False) -> list[Fact]:
        check_user(user)
        return self.graph.facts(user, check_time(as_of, "as_of"), include_history)

    def session_view(self, session_id: str) -> tuple[Session, list[Episode]]:
        session = self.session(session_id)
        return session, self.log.episodes(session_id=session_id)

    # --- forgetting -------------------------------------------------------------------------

    def _purge(self) -> None:
        # forget is a privacy request: the deleted text must leave the files, not only the API.
        self.retriever.purge()
        self.log.purge()
        self.graph.store.purge()

    def forget(self, user: str, memory_id: str | None = None, subject: str | None = None, everything: bool = False) -> ForgetResult:
        check_user(user)
        if not (memory_id or subject or everything):
            raise MemoryInputError("say what to forget: a memory_id, a subject, or everything=true for all of this user's memories")
        with self._lock:
            if everything:
                episodes = self.log.count(user)
                facts = len(self.graph.facts(user, include_history=True))
                lessons = len(self.log.lessons(user))
                self.retriever.remove(where={"user": user})
                self.graph.delete_user(user)
                self.log.delete_user(user)
                self._purge()
                log_event(log, "forgot a user", user=user)
                return ForgetResult(episodes, facts, lessons, 0)
            doomed: set[str] = set()
            fact_count = 0
            if memory_id:
                found = self.log.episodes(user=user, ids=[memory_id])
                if not found:
                    raise MemoryInputError(f"no memory {memory_id!r} for user {user!r}; recall shows each memory's id")
                doomed.add(memory_id)
            if subject:
                name = subject.strip()
                if not name:
                    raise MemoryInputError("subject is empty")
                known = {key(n) for _, n, _ in self.graph.entities(user)}
                mentions = self.log.episode_ids_mentioning(user, name)
                if key(name) not in known and not mentions:
                    raise MemoryInputError(f"nothing remembered about {subject!r} for user {user!r}")
                fact_ids, sources = self.graph.delete_entity(user, name, now())
                fact_count += len(fact_ids)
                self.retriever.remove(ids=[f"fact:{f}" for f in fact_ids])
                doomed.update(sources)
                doomed.update(mentions)
                node = entity_id(user, name)
                doomed.update(m for m, e in self.graph.mentions(user) if e == node)
            fact_count += self._erase(sorted(doomed), user)
            deleted, rewritten = self._prune_lessons(user, doomed)
            self._purge()
            log_event(log, "forgot", user=user, episodes=len(doomed), facts=fact_count)
            return ForgetResult(len(doomed), fact_count, deleted, rewritten)

    def _erase(self, memory_ids: Sequence[str], user: str) -> int:
        """Remove these episodes and the facts they asserted from every store."""
        if not memory_ids:
            return 0
        fact_ids = self.graph.delete_sourced_from(user, memory_ids, now())
        self.retriever.remove(ids=[*memory_ids, *(f"fact:{f}" for f in fact_ids)])
        self.log.delete_episodes(memory_ids)
        return len(fact_ids)

    def _prune_lessons(self, user: str, gone: set[str]) -> tuple[int, int]:
        """Lessons citing forgotten episodes are rewritten from what is left, or deleted."""
        affected = [x for x in self.log.lessons(user) if gone & set(x.evidence)]
        deleted, rewritten = [], []
        for lesson in affected:
            remaining = self.log.episodes(user=user, ids=[e for e in lesson.evidence if e not in gone])
            if not remaining:
                deleted.append(lesson.id)
                continue
            lesson_logic.rebuild(lesson, remaining, now(), self.embedder.embed([e.text for e in remaining]))
            rewritten.append(lesson)
        if affected:
            self.log.save_lessons(rewritten, delete=deleted)
            if deleted:
                self.retriever.remove(ids=deleted)
            if rewritten:
                self._index_lessons(rewritten)
        return len(deleted), len(rewritten)
