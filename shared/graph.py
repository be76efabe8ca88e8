"""A property graph with two backends behind one interface.

- SQLite (default): one file per namespace under the data home, edges walked with recursive CTEs.
- Bolt (``graph.url``): Neo4j or any server that speaks Bolt and openCypher (FalkorDB in tests),
  through one long-lived ``neo4j`` driver. Cypher stays in the portable subset.

Every node and edge belongs to a namespace (``wiki``, ``memory``...), so several servers share one
Bolt database without seeing each other's data. Properties are flat: strings, numbers, booleans, or
lists of those; setting a property to None removes it. ``where`` filters are equality on properties.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hydrabrain.shared.config import Settings

Props = Mapping[str, Any]
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PREFIX = "p_"


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    props: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    id: str
    src: str
    rel: str
    dst: str
    props: dict[str, Any] = field(default_factory=dict)


class GraphError(ValueError):
    """A graph operation was given something it cannot store or find."""


class GraphStore(Protocol):
    namespace: str

    def upsert_node(self, node_id: str, label: str, props: Props | None = None) -> None: ...
    def get_node(self, node_id: str) -> Node | None: ...
    def nodes(self, label: str | None = None, where: Props | None = None, limit: int | None = None) -> list[Node]: ...
    def delete_node(self, node_id: str) -> None: ...
    def add_edge(self, src: str, rel: str, dst: str, props: Props | None = None, edge_id: str | None = None) -> str: ...
    def update_edge(self, edge_id: str, props: Props) -> None: ...
    def edges(self, src: str | None = None, rel: str | None = None, dst: str | None = None, where: Props | None = None) -> list[Edge]: ...
    def delete_edges(self, edge_ids: Sequence[str]) -> None: ...
    def neighbors(self, node_ids: Sequence[str], depth: int = 1, rel: str | None = None) -> dict[str, int]: ...
    def clear(self) -> None: ...
    def purge(self) -> None: ...
    def close(self) -> None: ...


def _check_props(props: Props | None) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in (props or {}).items():
        if not _KEY.match(key):
            raise GraphError(f"property name {key!r} must be an identifier (letters, digits, '_')")
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise GraphError(f"property {key!r}: lists may hold only strings, numbers and booleans")
            value = list(value)
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise GraphError(f"property {key!r}: {type(value).__name__} cannot be stored; use a string, number, boolean or list")
        clean[key] = value
    return clean


def _check_name(kind: str, value: str) -> str:
    if not value or not isinstance(value, str) or len(value) > 512:
        raise GraphError(f"{kind} must be a non-empty string of at most 512 characters")
    return value


class SqliteGraphStore:
    def __init__(self, path: Path, namespace: str) -> None:
        self.namespace = namespace
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA secure_delete=ON")  # deleted facts are overwritten, not left in free pages
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, label TEXT NOT NULL, props TEXT NOT NULL DEFAULT '{}');
            CREATE TABLE IF NOT EXISTS edges (
                id TEXT PRIMARY KEY, src TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
                rel TEXT NOT NULL, dst TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
                props TEXT NOT NULL DEFAULT '{}');
            CREATE INDEX IF NOT EXISTS nodes_label ON nodes(label);
            CREATE INDEX IF NOT EXISTS edges_src ON edges(src, rel);
            CREATE INDEX IF NOT EXISTS edges_dst ON edges(dst, rel);
            """
        )

    def _where_sql(self, where: Props | None, table: str) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for key, value in _check_props(where).items():
            if isinstance(value, list):
                raise GraphError("where filters compare single values")
            clauses.append(f"json_extract({table}.props, '$.{key}') = ?")
            args.append(int(value) if isinstance(value, bool) else value)
        return " AND ".join(clauses), args

    def upsert_node(self, node_id: str, label: str, props: Props | None = None) -> None:
        _check_name("node id", node_id)
        _check_name("label", label)
        new = _check_props(props)
        with self._lock:
            row = self._db.execute("SELECT props FROM nodes WHERE id = ?", (node_id,)).fetchone()
            merged = json.loads(row[0]) if row else {}
            merged.update(new)
            merged = {k: v for k, v in merged.items() if v is not None}
            self._db.execute(
                "INSERT INTO nodes (id, label, props) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET label = excluded.label, props = excluded.props",
                (node_id, label, json.dumps(merged)),
            )

    def get_node(self, node_id: str) -> Node | None:
        with self._lock:
            row = self._db.execute("SELECT id, label, props FROM nodes WHERE id = ?", (node_id,)).fetchone()
        return Node(row[0], row[1], json.loads(row[2])) if row else None

    def nodes(self, label: str | None = None, where: Props | None = None, limit: int | None = None) -> list[Node]:
        sql, args = "SELECT id, label, props FROM nodes WHERE 1=1", []
        if label is not None:
            sql += " AND label = ?"
            args.append(label)
        clause, more = self._where_sql(where, "nodes")
        if clause:
            sql += f" AND {clause}"
            args += more
        sql += " ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Node(r[0], r[1], json.loads(r[2])) for r in rows]

    def delete_node(self, node_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def add_edge(self, src: str, rel: str, dst: str, props: Props | None = None, edge_id: str | None = None) -> str:
        _check_name("relation", rel)
        edge_id = edge_id or uuid.uuid4().hex
        data = {k: v for k, v in _check_props(props).items() if v is not None}
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO edges (id, src, rel, dst, props) VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET props = excluded.props",
                    (edge_id, src, rel, dst, json.dumps(data)),
                )
            except sqlite3.IntegrityError:
                raise GraphError(f"cannot link {src!r} -[{rel}]-> {dst!r}: both nodes must exist first") from None
        return edge_id

    def update_edge(self, edge_id: str, props: Props) -> None:
        new = _check_props(props)
        with self._lock:
            row = self._db.execute("SELECT props FROM edges WHERE id = ?", (edge_id,)).fetchone()
            if row is None:
                raise GraphError(f"no edge {edge_id!r}")
            merged = {**json.loads(row[0]), **new}
            merged = {k: v for k, v in merged.items() if v is not None}
            self._db.execute("UPDATE edges SET props = ? WHERE id = ?", (json.dumps(merged), edge_id))

    def edges(self, src: str | None = None, rel: str | None = None, dst: str | None = None, where: Props | None = None) -> list[Edge]:
        sql, args = "SELECT id, src, rel, dst, props FROM edges WHERE 1=1", []
        for column, value in (("src", src), ("rel", rel), ("dst", dst)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        clause, more = self._where_sql(where, "edges")
        if clause:
            sql += f" AND {clause}"
            args += more
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
        return [Edge(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def delete_edges(self, edge_ids: Sequence[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM edges WHERE id = ?", [(e,) for e in edge_ids])

    def neighbors(self, node_ids: Sequence[str], depth: int = 1, rel: str | None = None) -> dict[str, int]:
        if not node_ids or depth < 1:
            return {}
        rel_clause = "AND e.rel = :rel" if rel else ""
        seeds = ",".join(f":s{i}" for i in range(len(node_ids)))
        sql = f"""
            WITH RECURSIVE walk(id, hops) AS (
                SELECT id, 0 FROM nodes WHERE id IN ({seeds})
                UNION
                SELECT CASE WHEN e.src = walk.id THEN e.dst ELSE e.src END, walk.hops + 1
                FROM walk JOIN edges e ON (e.src = walk.id OR e.dst = walk.id) {rel_clause}
                WHERE walk.hops < :depth
            )
            SELECT id, MIN(hops) FROM walk GROUP BY id
        """
        args: dict[str, Any] = {f"s{i}": n for i, n in enumerate(node_ids)}
        args["depth"] = depth
        if rel:
            args["rel"] = rel
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        seeds_set = set(node_ids)
        return {r[0]: int(r[1]) for r in rows if r[0] not in seeds_set}

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM edges")
            self._db.execute("DELETE FROM nodes")

    def purge(self) -> None:
        """Empty the WAL, so deleted rows survive in no file."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _flatten(props: dict[str, Any]) -> dict[str, Any]:
    return {f"{_PREFIX}{k}": v for k, v in props.items()}


def _unflatten(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(_PREFIX):]: v for k, v in record.items() if k.startswith(_PREFIX)}


class BoltGraphStore:
    """Nodes are (:HBNode {ns, id, label, p_*}); edges [:HB_EDGE {ns, id, rel, p_*}]."""

    _drivers: dict[tuple[str, str | None], Any] = {}
    _drivers_lock = threading.Lock()

    def __init__(self, url: str, namespace: str, user: str | None = None, password: str | None = None) -> None:
        import neo4j

        self.namespace = namespace
        key = (url, user)
        with self._drivers_lock:
            driver = self._drivers.get(key)
            if driver is None:
                # One long-lived driver per server: a fresh connection right after another closes can hang.
                auth = (user, password or "") if user else None
                driver = neo4j.GraphDatabase.driver(url, auth=auth, connection_timeout=10, max_transaction_retry_time=5)
                driver.verify_connectivity()
                self._drivers[key] = driver
        self._driver = driver

    def _run(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with self._driver.session() as session:
            result = session.run(query, ns=self.namespace, **params)
            return [record.data() for record in result]

    def _where_cypher(self, var: str, where: Props | None) -> tuple[str, dict[str, Any]]:
        clauses, params = [], {}
        for i, (key, value) in enumerate(_check_props(where).items()):
            clauses.append(f"{var}.{_PREFIX}{key} = $w{i}")
            params[f"w{i}"] = value
        return (" AND " + " AND ".join(clauses)) if clauses else "", params

    def upsert_node(self, node_id: str, label: str, props: Props | None = None) -> None:
        _check_name("node id", node_id)
        _check_name("label", label)
        data = _check_props(props)
        self._run(
            "MERGE (n:HBNode {ns: $ns, id: $id}) SET n.label = $label SET n += $props",
            id=node_id, label=label, props=_flatten(data),
        )
        removed = [k for k, v in data.items() if v is None]
        for key in removed:
            self._run(f"MATCH (n:HBNode {{ns: $ns, id: $id}}) REMOVE n.{_PREFIX}{key}", id=node_id)

    def get_node(self, node_id: str) -> Node | None:
        rows = self._run("MATCH (n:HBNode {ns: $ns, id: $id}) RETURN properties(n) AS p", id=node_id)
        if not rows:
            return None
        p = rows[0]["p"]
        return Node(p["id"], p["label"], _unflatten(p))

    def nodes(self, label: str | None = None, where: Props | None = None, limit: int | None = None) -> list[Node]:
        clause, params = self._where_cypher("n", where)
        if label is not None:
            clause += " AND n.label = $label"
            params["label"] = label
        query = f"MATCH (n:HBNode) WHERE n.ns = $ns{clause} RETURN properties(n) AS p ORDER BY n.id"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return [Node(r["p"]["id"], r["p"]["label"], _unflatten(r["p"])) for r in self._run(query, **params)]

    def delete_node(self, node_id: str) -> None:
        self._run("MATCH (n:HBNode {ns: $ns, id: $id}) DETACH DELETE n", id=node_id)

    def add_edge(self, src: str, rel: str, dst: str, props: Props | None = None, edge_id: str | None = None) -> str:
        _check_name("relation", rel)
        edge_id = edge_id or uuid.uuid4().hex
        data = {k: v for k, v in _check_props(props).items() if v is not None}
        existing = self._run("MATCH ()-[r:HB_EDGE {ns: $ns, id: $eid}]->() RETURN r.id AS id", eid=edge_id)
        if existing:
            self.update_edge(edge_id, data)
            return edge_id
        rows = self._run(
            "MATCH (a:HBNode {ns: $ns, id: $src}), (b:HBNode {ns: $ns, id: $dst}) "
            "CREATE (a)-[r:HB_EDGE {ns: $ns, id: $eid, rel: $rel}]->(b) SET r += $props RETURN r.id AS id",
            src=src, dst=dst, eid=edge_id, rel=rel, props=_flatten(data),
        )
        if not rows:
            raise GraphError(f"cannot link {src!r} -[{rel}]-> {dst!r}: both nodes must exist first")
        return edge_id

    def update_edge(self, edge_id: str, props: Props) -> None:
        data = _check_props(props)
        rows = self._run(
            "MATCH ()-[r:HB_EDGE {ns: $ns, id: $eid}]->() SET r += $props RETURN r.id AS id",
            eid=edge_id, props=_flatten({k: v for k, v in data.items() if v is not None}),
        )
        if not rows:
            raise GraphError(f"no edge {edge_id!r}")
        for key in [k for k, v in data.items() if v is None]:
            self._run(f"MATCH ()-[r:HB_EDGE {{ns: $ns, id: $eid}}]->() REMOVE r.{_PREFIX}{key}", eid=edge_id)

    def edges(self, src: str | None = None, rel: str | None = None, dst: str | None = None, where: Props | None = None) -> list[Edge]:
        clause, params = self._where_cypher("r", where)
        for name, value in (("a.id", src), ("r.rel", rel), ("b.id", dst)):
            if value is not None:
                key = f"f{len(params)}"
                clause += f" AND {name} = ${key}"
                params[key] = value
        rows = self._run(
            f"MATCH (a:HBNode)-[r:HB_EDGE]->(b:HBNode) WHERE r.ns = $ns{clause} "
            "RETURN a.id AS src, b.id AS dst, properties(r) AS p ORDER BY r.id",
            **params,
        )
        return [Edge(r["p"]["id"], r["src"], r["p"]["rel"], r["dst"], _unflatten(r["p"])) for r in rows]

    def delete_edges(self, edge_ids: Sequence[str]) -> None:
        if edge_ids:
            self._run("MATCH ()-[r:HB_EDGE]->() WHERE r.ns = $ns AND r.id IN $ids DELETE r", ids=list(edge_ids))

    def neighbors(self, node_ids: Sequence[str], depth: int = 1, rel: str | None = None) -> dict[str, int]:
        if not node_ids or depth < 1:
            return {}
        found: dict[str, int] = {}
        frontier = list(dict.fromkeys(node_ids))
        seen = set(frontier)
        # Breadth-first, one hop per query: portable across Cypher dialects and bounded in cost.
        for hop in range(1, depth + 1):
            rel_clause = " AND r.rel = $rel" if rel else ""
            rows = self._run(
                "MATCH (a:HBNode)-[r:HB_EDGE]-(b:HBNode) WHERE a.ns = $ns AND a.id IN $ids"
                f"{rel_clause} RETURN DISTINCT b.id AS id",
                ids=frontier, rel=rel,
            )
            frontier = [r["id"] for r in rows if r["id"] not in seen]
            for node in frontier:
                seen.add(node)
                found[node] = hop
            if not frontier:
                break
        return found

    def clear(self) -> None:
        self._run("MATCH (n:HBNode) WHERE n.ns = $ns DETACH DELETE n")

    def purge(self) -> None:
        """Nothing to do here: the graph server owns its files."""
        return None

    def close(self) -> None:
        # The driver is shared for the life of the process.
        return None


def open_graph_store(settings: Settings, namespace: str) -> GraphStore:
    """The graph for `namespace`: SQLite under the data home, or the configured Bolt server."""
    if not _KEY.match(namespace):
        raise GraphError(f"namespace {namespace!r} must be an identifier")
    cfg = settings.graph
    if cfg.url:
        return BoltGraphStore(cfg.url, namespace, cfg.user, os.environ.get(cfg.password_env))
    return SqliteGraphStore(settings.home / "graph" / f"{namespace}.sqlite", namespace)
