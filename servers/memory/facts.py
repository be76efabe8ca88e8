"""The bi-temporal fact graph on the shared graph store (namespace ``memory``).

Entities are nodes; a fact is a ``fact`` edge subject -> object carrying two time axes:
``valid_from``/``valid_to`` (when it was true in the world) and ``recorded_at``/``invalidated_at``
(when the server learned it and when it learned otherwise). Facts are never overwritten: for one
subject and predicate, each fact stays valid until the next one with a later ``valid_from`` begins.
The timeline is recomputed from the edges themselves, so facts told out of order, or deleted for a
privacy request, leave the remaining history consistent. Facts asserted at the same instant do not
supersede each other (an imported graph may hold several objects for one predicate).

Episodes are nodes too, linked to the entities they mention, so recall can walk from one episode to
others about the same things.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hydrabrain.servers.memory.timeutil import to_iso
from hydrabrain.shared.graph import Edge, GraphStore

ENTITY = "entity"
EPISODE = "episode"
FACT = "fact"
MENTIONS = "mentions"
MAX_FIELD_CHARS = 300
_SPACE = re.compile(r"\s+")


class FactFormatError(ValueError):
    """A fact the server cannot store; the message names the field."""


@dataclass(frozen=True)
class FactInput:
    subject: str
    predicate: str
    object: str


@dataclass(frozen=True)
class Fact:
    id: str
    user: str
    subject: str
    predicate: str
    object: str
    valid_from: float
    valid_to: float | None
    recorded_at: float
    invalidated_at: float | None
    source: str | None

    def valid_at(self, ts: float) -> bool:
        return self.valid_from <= ts and (self.valid_to is None or ts < self.valid_to)

    @property
    def current(self) -> bool:
        return self.valid_to is None

    @property
    def text(self) -> str:
        return f"{self.subject} {self.predicate} {self.object}"

    def as_dict(self) -> dict[str, object]:
        return {
            "fact_id": self.id,
            "subject": self.subject,
            "predicate": self.predicate,
            "object": self.object,
            "valid_from": to_iso(self.valid_from),
            "valid_to": to_iso(self.valid_to),
            "recorded_at": to_iso(self.recorded_at),
            "invalidated_at": to_iso(self.invalidated_at),
            "source_memory_id": self.source,
            "current": self.current,
        }


def clean(value: object, field: str, index: int | None = None) -> str:
    where = f"facts[{index}].{field}" if index is not None else field
    if not isinstance(value, str):
        raise FactFormatError(f"{where} must be a string, got {type(value).__name__}")
    text = _SPACE.sub(" ", value).strip()
    if not text:
        raise FactFormatError(f"{where} is empty; every fact needs a subject, a predicate and an object")
    if len(text) > MAX_FIELD_CHARS:
        raise FactFormatError(f"{where} is {len(text)} characters; keep each fact field under {MAX_FIELD_CHARS}")
    return text


def parse_facts(raw: Iterable[object] | None) -> list[FactInput]:
    """Validate agent-supplied facts before anything is stored."""
    facts: list[FactInput] = []
    for i, item in enumerate(raw or []):
        if isinstance(item, FactInput):
            data = {"subject": item.subject, "predicate": item.predicate, "object": item.object}
        elif isinstance(item, dict):
            data = item
        elif hasattr(item, "model_dump"):
            data = item.model_dump()
        else:
            raise FactFormatError(f"facts[{i}] must be an object with subject, predicate and object")
        missing = [k for k in ("subject", "predicate", "object") if k not in data or data[k] is None]
        if missing:
            raise FactFormatError(f"facts[{i}] lacks {', '.join(missing)}; give {{subject, predicate, object}}")
        facts.append(FactInput(clean(data["subject"], "subject", i), clean(data["predicate"], "predicate", i), clean(data["object"], "object", i)))
    return facts


def key(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def entity_id(user: str, name: str) -> str:
    digest = hashlib.sha1(f"{user}\x00{key(name)}".encode()).hexdigest()[:24]
    return f"ent:{digest}"


def _fact(edge: Edge) -> Fact:
    p = edge.props
    return Fact(
        edge.id, str(p.get("user")), str(p.get("subject")), str(p.get("predicate")), str(p.get("object")),
        float(p["valid_from"]), _opt(p.get("valid_to")), float(p["recorded_at"]), _opt(p.get("invalidated_at")),
        p.get("source"),
    )


def _opt(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


class FactGraph:
    def __init__(self, store: GraphStore) -> None:
        self.store = store

    # --- writing ----------------------------------------------------------------------------

    def ensure_entity(self, user: str, name: str, entity_type: str | None = None) -> str:
        node_id = entity_id(user, name)
        existing = self.store.get_node(node_id)
        props: dict[str, object] = {"user": user, "name": name if existing is None else existing.props.get("name", name), "key": key(name)}
        if entity_type:
            props["entity_type"] = entity_type
        if existing is None or entity_type:
            self.store.upsert_node(node_id, ENTITY, props)
        return node_id

    def add_episode(self, user: str, memory_id: str, entities: Sequence[str]) -> None:
        """An episode node linked to the entities it is about."""
        self.store.upsert_node(memory_id, EPISODE, {"user": user})
        for name in dict.fromkeys(entities):
            self.store.add_edge(memory_id, MENTIONS, self.ensure_entity(user, name), {"user": user})

    def add_episodes(self, user: str, episodes: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Many (memory_id, entities) episodes; each entity node is looked up once."""
        known: dict[str, str] = {}
        for memory_id, entities in episodes:
            self.store.upsert_node(memory_id, EPISODE, {"user": user})
            for name in dict.fromkeys(entities):
                if key(name) not in known:
                    known[key(name)] = self.ensure_entity(user, name)
                self.store.add_edge(memory_id, MENTIONS, known[key(name)], {"user": user})

    def assert_fact(self, user: str, fact: FactInput, at: float, recorded_at: float, source: str | None) -> tuple[Fact, bool]:
        """Store a fact; returns it and whether it is new (False: it restates what was already true at `at`)."""
        src = self.ensure_entity(user, fact.subject)
        dst = self.ensure_entity(user, fact.object)
        history = self._history(user, src, key(fact.predicate))
        for old in history:
            if old.valid_at(at) and key(old.object) == key(fact.object):
                return old, False
        props = {
            "user": user, "subject": fact.subject, "predicate": fact.predicate, "pkey": key(fact.predicate),
            "object": fact.object, "valid_from": at, "recorded_at": recorded_at, "source": source,
        }
        edge_id = self.store.add_edge(src, FACT, dst, props)
        self._retime(user, src, key(fact.predicate), recorded_at)
        stored = next(f for f in self._history(user, src, key(fact.predicate)) if f.id == edge_id)
        return stored, True

    def _history(self, user: str, subject_node: str, pkey: str) -> list[Fact]:
        edges = self.store.edges(src=subject_node, rel=FACT, where={"user": user, "pkey": pkey})
        return sorted((_fact(e) for e in edges), key=lambda f: (f.valid_from, f.recorded_at))

    def _retime(self, user: str, subject_node: str, pkey: str, now: float) -> None:
        """Each fact is valid until the next later-starting fact for the same subject and predicate."""
        history = self._history(user, subject_node, pkey)
        starts = sorted({f.valid_from for f in history})
        for fact in history:
            later = [s for s in starts if s > fact.valid_from]
            valid_to = later[0] if later else None
            if valid_to == fact.valid_to:
                continue
            superseding = next((f.id for f in history if later and f.valid_from == valid_to), None)
            self.store.update_edge(
                fact.id,
                {
                    "valid_to": valid_to,
                    "invalidated_at": (fact.invalidated_at or now) if valid_to is not None else None,
                    "invalidated_by": superseding,
                },
            )

    # --- reading ----------------------------------------------------------------------------

    def facts(self, user: str, as_of: float | None = None, include_history: bool = False) -> list[Fact]:
        found = [_fact(e) for e in self.store.edges(rel=FACT, where={"user": user})]
        if not include_history:
            found = [f for f in found if (f.valid_at(as_of) if as_of is not None else f.current)]
        return sorted(found, key=lambda f: (key(f.subject), key(f.predicate), f.valid_from))

    def get(self, user: str, fact_ids: Sequence[str]) -> dict[str, Fact]:
        wanted = set(fact_ids)
        if not wanted:
            return {}
        return {f.id: f for f in self.facts(user, include_history=True) if f.id in wanted}

    def entities(self, user: str) -> list[tuple[str, str, str | None]]:
        """(node id, name, entity type) of every entity the user has."""
        return [(n.id, str(n.props.get("name", "")), n.props.get("entity_type")) for n in self.store.nodes(ENTITY, where={"user": user})]

    def mentions(self, user: str) -> list[tuple[str, str]]:
        """(memory id, entity node id) for every episode -> entity link."""
        return [(e.src, e.dst) for e in self.store.edges(rel=MENTIONS, where={"user": user})]

    def neighbours(self, user: str, node_ids: Sequence[str], limit: int = 30) -> dict[str, int]:
        """Episodes two hops away (through a shared entity), nearest first, at most `limit`."""
        found = self.store.neighbors(list(node_ids), depth=2, rel=MENTIONS)
        episodes = {n: h for n, h in found.items() if not n.startswith("ent:")}
        return dict(sorted(episodes.items(), key=lambda kv: (kv[1], kv[0]))[:limit])

    # --- deleting ---------------------------------------------------------------------------

    def delete_sourced_from(self, user: str, memory_ids: Sequence[str], now: float) -> list[str]:
        """Delete the facts these episodes asserted and the episode nodes; returns the fact ids deleted."""
        wanted = set(memory_ids)
        doomed = [f for f in self.facts(user, include_history=True) if f.source in wanted]
        self.store.delete_edges([f.id for f in doomed])
        for memory_id in wanted:
            self.store.delete_node(memory_id)
        for subject_node, pkey in {(entity_id(user, f.subject), key(f.predicate)) for f in doomed}:
            self._retime(user, subject_node, pkey, now)
        self.prune_entities(user)
        return [f.id for f in doomed]

    def delete_entity(self, user: str, name: str, now: float) -> tuple[list[str], list[str]]:
        """Delete an entity and every fact about it; returns (fact ids deleted, memory ids that asserted them)."""
        node_id = entity_id(user, name)
        doomed = [f for f in self.facts(user, include_history=True) if node_id in (entity_id(user, f.subject), entity_id(user, f.object))]
        self.store.delete_edges([f.id for f in doomed])
        self.store.delete_node(node_id)
        for subject_node, pkey in {(entity_id(user, f.subject), key(f.predicate)) for f in doomed}:
            self._retime(user, subject_node, pkey, now)
        self.prune_entities(user)
        return [f.id for f in doomed], sorted({f.source for f in doomed if f.source})

    def prune_entities(self, user: str) -> None:
        """Entities nothing refers to any more are removed (a forgotten name must not linger)."""
        linked: set[str] = set()
        for edge in self.store.edges(where={"user": user}):
            linked.update((edge.src, edge.dst))
        for node_id, _, _ in self.entities(user):
            if node_id not in linked:
                self.store.delete_node(node_id)

    def delete_user(self, user: str) -> None:
        for node in self.store.nodes(where={"user": user}):
            self.store.delete_node(node.id)
