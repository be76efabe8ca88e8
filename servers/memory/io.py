"""Move to and from the reference MCP memory server's knowledge-graph file (JSON Lines).

Each line is an entity ``{"type": "entity", "name", "entityType", "observations": [...]}`` or a
relation ``{"type": "relation", "from", "to", "relationType"}``. Importing makes each observation an
episode about its entity and each relation a current fact; every relation of one file is asserted at
the same instant, so several objects for one predicate stay current together. Export writes the same
shape back: entities with the observations recorded about them, and the relations true now.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hydrabrain.servers.memory.core import FACT_ITEM, MemoryInputError, MemoryService
from hydrabrain.servers.memory.facts import FactFormatError, FactInput, clean, key
from hydrabrain.servers.memory.timeutil import now

MAX_LINE_CHARS = 200_000


@dataclass
class ImportResult:
    session_id: str
    entities: int
    observations: int
    relations: int


def parse_jsonl(lines: Iterable[str], max_text_chars: int) -> tuple[list[dict[str, Any]], list[FactInput]]:
    """Entities and relations, every line checked before anything is stored."""
    entities: dict[str, dict[str, Any]] = {}
    relations: list[FactInput] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_CHARS:
            raise MemoryInputError(f"line {number} is {len(line)} characters; the limit is {MAX_LINE_CHARS}")
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemoryInputError(f"line {number} is not JSON: {exc.msg}") from None
        if not isinstance(item, dict) or item.get("type") not in ("entity", "relation"):
            raise MemoryInputError(f"line {number}: expected an object with type 'entity' or 'relation'")
        try:
            if item["type"] == "entity":
                name = clean(item.get("name"), f"line {number}: name")
                observations = item.get("observations") or []
                if not isinstance(observations, list) or not all(isinstance(o, str) for o in observations):
                    raise MemoryInputError(f"line {number}: observations must be a list of strings")
                too_long = [o for o in observations if len(o) > max_text_chars]
                if too_long:
                    raise MemoryInputError(f"line {number}: an observation is {len(too_long[0])} characters; the limit is {max_text_chars}")
                entry = entities.setdefault(key(name), {"name": name, "entityType": None, "observations": []})
                entry["entityType"] = clean(item.get("entityType") or "entity", f"line {number}: entityType")
                entry["observations"] += [o for o in observations if o.strip()]
            else:
                relations.append(FactInput(
                    clean(item.get("from"), f"line {number}: from"),
                    clean(item.get("relationType"), f"line {number}: relationType"),
                    clean(item.get("to"), f"line {number}: to"),
                ))
        except FactFormatError as exc:
            raise MemoryInputError(str(exc)) from None
    return list(entities.values()), relations


def import_jsonl(service: MemoryService, user: str, lines: Iterable[str], team: str | None = None, source: str = "knowledge graph") -> ImportResult:
    entities, relations = parse_jsonl(lines, service.cfg.max_text_chars)
    session = service.start_session(user, task=f"import of {source}", team=team)
    at = now()
    records, mentions = [], []
    with service._lock:
        for entity in entities:
            service.graph.ensure_entity(user, entity["name"], entity["entityType"])
            for observation in entity["observations"]:
                records.append((f"{entity['name']}: {observation.strip()}", "observation", at))
                mentions.append([entity["name"]])
        service.bulk_remember(session, records, entities=mentions)
        items = []
        for relation in relations:
            fact, is_new = service.graph.assert_fact(user, relation, at, at, None)
            if is_new:
                items.append((f"fact:{fact.id}", fact.text, {**service._payload(session, FACT_ITEM, at), "fact_id": fact.id}))
        service.retriever.index(items)
    service.end_session(session.id)
    return ImportResult(session.id, len(entities), len(records), len(relations))


@dataclass
class TurnsImportResult:
    session_ids: list[str]
    turns: int
    seconds: float


def import_turns(service: MemoryService, user: str, lines: Iterable[str], team: str | None = None) -> TurnsImportResult:
    """Whole conversations, one session per line: ``{"session": name?, "turns": [{speaker, text, at?}, ...]}``.

    Every line is read and checked before the first is stored, so a bad file writes nothing.
    """
    import time

    sessions: list[tuple[str | None, list]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) > 50 * MAX_LINE_CHARS:
            raise MemoryInputError(f"line {number} is {len(line)} characters; split the session over several lines")
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemoryInputError(f"line {number} is not JSON: {exc.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get("turns"), list):
            raise MemoryInputError(f'line {number}: expected {{"session": name, "turns": [{{speaker, text, at?}}, ...]}}')
        name = item.get("session")
        if name is not None and not isinstance(name, str):
            raise MemoryInputError(f"line {number}: session must be a name (a string)")
        try:
            service.parse_turns(item["turns"])
        except MemoryInputError as exc:
            raise MemoryInputError(f"line {number}: {exc}") from None
        sessions.append((name, item["turns"]))
    if not sessions:
        raise MemoryInputError("no sessions in the file; write one JSON object per line with its turns")
    started = time.perf_counter()
    ids, count = [], 0
    for name, turns in sessions:
        session = service.start_session(user, task=name, team=team)
        count += len(service.remember_turns(session.id, turns).memory_ids)
        service.end_session(session.id)
        ids.append(session.id)
    return TurnsImportResult(ids, count, time.perf_counter() - started)


def export_jsonl(service: MemoryService, user: str) -> list[str]:
    """The user's knowledge graph in the reference server's shape, one JSON object per line."""
    entities = service.graph.entities(user)
    observations: dict[str, list[str]] = {}
    for episode in service.log.episodes(user=user):
        if episode.entities:
            name = episode.entities[0]
            prefix = f"{name}: "
            text = episode.text[len(prefix):] if episode.text.startswith(prefix) else episode.text
            observations.setdefault(key(name), []).append(text)
    lines = []
    for _, name, entity_type in sorted(entities, key=lambda e: key(e[1])):
        lines.append(json.dumps({"type": "entity", "name": name, "entityType": entity_type or "entity", "observations": observations.get(key(name), [])}))
    for fact in service.graph.facts(user):
        lines.append(json.dumps({"type": "relation", "from": fact.subject, "to": fact.object, "relationType": fact.predicate}))
    return lines
