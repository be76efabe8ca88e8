"""A vector store with two backends behind one interface.

- Qdrant Edge (in-process HNSW, payload indexes, WAL) under the data home: the default.
- qdrant-client against a Qdrant server or cluster when ``vectors.url`` is set (``":memory:"``
  selects qdrant-client's in-process mode, which answers the server's API; tests use it).

Ids are the caller's strings; Qdrant wants integers or UUIDs, so each id maps to a UUID5 and the
original rides in the payload under ``_id``. Filters are ``{field: value}`` (equality) or
``{field: [v1, v2]}`` (any of), all of them required; fields you filter on should be named in
``indexed`` when the store is opened so both backends index them.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hydrabrain.shared.config import Settings

Scalar = str | int | bool
Where = Mapping[str, Scalar | Sequence[Scalar]]
_ID_NAMESPACE = uuid.UUID("6f0f8a4e-3c1b-4e0b-9a57-3f2f6b1d2c10")
ID_FIELD = "_id"


def point_uuid(point_id: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, point_id))


@dataclass(frozen=True)
class VectorPoint:
    id: str
    vector: np.ndarray | Sequence[float]
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VectorHit:
    id: str
    score: float
    payload: dict[str, Any]


class VectorStore(Protocol):
    dim: int

    def upsert(self, points: Iterable[VectorPoint]) -> None: ...
    def search(self, vector: np.ndarray | Sequence[float], k: int = 10, where: Where | None = None) -> list[VectorHit]: ...
    def delete(self, ids: Sequence[str] | None = None, where: Where | None = None) -> None: ...
    def count(self, where: Where | None = None) -> int: ...
    def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...
    def purge(self) -> None: ...
    def close(self) -> None: ...


def _as_list(vector: np.ndarray | Sequence[float]) -> list[float]:
    return np.asarray(vector, dtype=np.float32).reshape(-1).tolist()


def _check_dim(vector: list[float], dim: int) -> list[float]:
    if len(vector) != dim:
        raise ValueError(f"vector has {len(vector)} dimensions, the store expects {dim}")
    return vector


def _payload(point: VectorPoint) -> dict[str, Any]:
    payload = dict(point.payload)
    payload[ID_FIELD] = point.id
    return payload


def _build_filter(lib: Any, where: Where | None) -> Any:
    """`where` as a Filter of `lib` (qdrant_edge or qdrant_client.models: both spell conditions alike)."""
    if not where:
        return None
    conditions = []
    for key, value in where.items():
        if isinstance(value, (list, tuple, set)):
            conditions.append(lib.FieldCondition(key=key, match=lib.MatchAny(any=list(value))))
        else:
            conditions.append(lib.FieldCondition(key=key, match=lib.MatchValue(value=value)))
    return lib.Filter(must=conditions)


class StoreBusy(RuntimeError):
    """Another process has held the collection for longer than we are willing to wait."""


class EdgeVectorStore:
    """A Qdrant Edge shard in a folder; one instance per folder per process.

    A shard may be open in one process only: a second process that merely loads it can damage the
    first one's files. So the shard is opened under an exclusive file lock and closed again once
    it has been idle for `idle_release_s`, letting the suite's servers (each its own process when a
    client launches them from mcp.json) take turns on the wiki's or memory's collection. A burst of
    calls (an ingest, a benchmark loop) keeps it open.
    """

    idle_release_s = 1.0
    lock_timeout_s = 60.0

    def __init__(self, path: Path, dim: int, indexed: Sequence[str] = (), hnsw_ef: int = 128, exact: bool = False) -> None:
        import qdrant_edge as qe

        self._qe = qe
        self.dim = dim
        self.path = path
        self._lock = threading.RLock()
        self._refs = 1
        self._closed = False
        self._shard = None
        self._lock_fd: int | None = None
        self._timer: threading.Timer | None = None
        self._last_used = 0.0
        self._params = qe.SearchParams(hnsw_ef=hnsw_ef, exact=exact)
        self._config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))
        self._indexed = (ID_FIELD, *indexed)
        with self._held() as shard:
            for name in self._indexed:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def _open(self) -> None:
        import fcntl
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent / f".{self.path.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreBusy(f"vector collection {self.path.name} has been busy in another process for {self.lock_timeout_s:g} s") from None
                time.sleep(0.02)
        try:
            qe = self._qe
            old = self.path.with_name(self.path.name + ".old")
            if not self.path.exists() and old.exists():  # a purge stopped between its renames
                os.replace(old, self.path)
            if self.path.exists() and any(self.path.iterdir()):
                self._shard = qe.EdgeShard.load(str(self.path), self._config)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._shard = qe.EdgeShard.create(str(self.path), self._config)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._lock_fd = fd

    def _release(self) -> None:
        """Flush, close and unlock the shard (it reopens on the next call)."""
        import fcntl

        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._shard is not None:
                try:
                    self._shard.flush()
                finally:
                    self._shard.close()
                    self._shard = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    @contextmanager
    def _held(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"vector collection {self.path.name} is closed")
            if self._shard is None:
                self._open()
            try:
                yield self._shard
            finally:
                # One watcher per idle period, not a timer thread per call: a recall makes a few calls
                # here, and starting a thread each time cost more than the search it followed.
                self._last_used = time.monotonic()
                if self._timer is None:
                    self._watch(self.idle_release_s)

    def _watch(self, delay: float) -> None:
        timer = threading.Timer(delay, self._release_if_idle)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _release_if_idle(self) -> None:
        with self._lock:
            if self._timer is None or self._timer is not threading.current_thread():
                return  # cancelled, or replaced, while this one waited for the lock
            self._timer = None
            idle = time.monotonic() - self._last_used
            if idle < self.idle_release_s:
                self._watch(self.idle_release_s - idle)  # used since: look again when it can have been idle long enough
                return
            self._release()  # still under the lock (re-entrant): no call can slip in between the check and the close

    def _filter(self, where: Where | None):  # noqa: ANN202 - qdrant_edge.Filter
        return _build_filter(self._qe, where)

    def upsert(self, points: Iterable[VectorPoint]) -> None:
        qe = self._qe
        batch = [qe.Point(point_uuid(p.id), _check_dim(_as_list(p.vector), self.dim), _payload(p)) for p in points]
        if not batch:
            return
        with self._held() as shard:
            for start in range(0, len(batch), 1024):
                shard.update(qe.UpdateOperation.upsert_points(batch[start : start + 1024]))

    def search(self, vector: np.ndarray | Sequence[float], k: int = 10, where: Where | None = None) -> list[VectorHit]:
        qe = self._qe
        request = qe.QueryRequest(
            limit=k,
            query=qe.Query.Nearest(_check_dim(_as_list(vector), self.dim)),
            filter=self._filter(where),
            with_payload=True,
            params=self._params,
        )
        with self._held() as shard:
            points = shard.query(request)
        hits = []
        for p in points:
            payload = dict(p.payload or {})
            hits.append(VectorHit(str(payload.pop(ID_FIELD, p.id)), float(p.score), payload))
        return hits

    def delete(self, ids: Sequence[str] | None = None, where: Where | None = None) -> None:
        qe = self._qe
        with self._held() as shard:
            if ids:
                shard.update(qe.UpdateOperation.delete_points([point_uuid(i) for i in ids]))
            if where:
                shard.update(qe.UpdateOperation.delete_points_by_filter(self._filter(where)))

    def count(self, where: Where | None = None) -> int:
        with self._held() as shard:
            return int(shard.count(self._qe.CountRequest(filter=self._filter(where), exact=True)))

    def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        with self._held() as shard:
            records = shard.retrieve([point_uuid(i) for i in ids], with_payload=True, with_vector=False)
        found: dict[str, dict[str, Any]] = {}
        for record in records:
            payload = dict(record.payload or {})
            found[str(payload.pop(ID_FIELD, record.id))] = payload
        return found

    def flush(self) -> None:
        with self._held() as shard:
            shard.flush()

    def purge(self) -> None:
        """Rewrite the collection from its live points, so deleted payloads leave the disk as well.

        Qdrant only marks a deleted point and drops it at a later optimisation, and its write-ahead
        log keeps the original upserts until it rotates; a privacy deletion (memory's `forget`)
        cannot wait for either. Costs one pass over the collection, so it is for deletions, not writes.
        """
        qe = self._qe
        with self._held() as shard:
            live: list[Any] = []
            offset = None
            while True:
                batch, offset = shard.scroll(qe.ScrollRequest(limit=512, offset=offset, with_payload=True, with_vector=True))
                live += [qe.Point(str(p.id), list(p.vector), dict(p.payload or {})) for p in batch]
                if offset is None:
                    break
            fresh = self.path.with_name(self.path.name + ".purge")
            shutil.rmtree(fresh, ignore_errors=True)
            fresh.mkdir(parents=True)
            rebuilt = qe.EdgeShard.create(str(fresh), self._config)
            try:
                for name in self._indexed:
                    rebuilt.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
                for start in range(0, len(live), 1024):
                    rebuilt.update(qe.UpdateOperation.upsert_points(live[start : start + 1024]))
                rebuilt.flush()
            finally:
                rebuilt.close()
            shard.close()
            self._shard = None
            old = self.path.with_name(self.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)  # a crash between these two renames is undone by _open
            os.replace(fresh, self.path)
            shutil.rmtree(old, ignore_errors=True)
            self._shard = qe.EdgeShard.load(str(self.path), self._config)  # still under this holder's file lock

    def close(self) -> None:
        """Release this holder's reference; the shard closes when the last holder lets go."""
        with self._lock:
            self._refs -= 1
            if self._refs <= 0:
                self._closed = True
                self._release()


class QdrantClientStore:
    """A collection on a Qdrant server (or qdrant-client's in-process mode for ':memory:')."""

    def __init__(self, url: str, collection: str, dim: int, indexed: Sequence[str] = (), api_key: str | None = None, hnsw_ef: int = 128, exact: bool = False) -> None:
        from qdrant_client import QdrantClient, models

        self._models = models
        self.dim = dim
        self.collection = collection
        self._local = url == ":memory:"
        self._client = QdrantClient(location=":memory:") if self._local else QdrantClient(url=url, api_key=api_key)
        # Local mode always searches exactly and ignores payload indexes (and warns if given them).
        self._params = None if self._local else models.SearchParams(hnsw_ef=hnsw_ef, exact=exact)
        if not self._client.collection_exists(collection):
            self._client.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
        for name in () if self._local else (ID_FIELD, *indexed):
            self._client.create_payload_index(collection, name, field_schema=models.PayloadSchemaType.KEYWORD)

    def _filter(self, where: Where | None):  # noqa: ANN202 - qdrant_client Filter
        return _build_filter(self._models, where)

    def upsert(self, points: Iterable[VectorPoint]) -> None:
        m = self._models
        batch = [m.PointStruct(id=point_uuid(p.id), vector=_check_dim(_as_list(p.vector), self.dim), payload=_payload(p)) for p in points]
        for start in range(0, len(batch), 512):
            self._client.upsert(self.collection, points=batch[start : start + 512])

    def search(self, vector: np.ndarray | Sequence[float], k: int = 10, where: Where | None = None) -> list[VectorHit]:
        response = self._client.query_points(
            self.collection,
            query=_check_dim(_as_list(vector), self.dim),
            query_filter=self._filter(where),
            limit=k,
            with_payload=True,
            search_params=self._params,
        )
        hits = []
        for p in response.points:
            payload = dict(p.payload or {})
            hits.append(VectorHit(str(payload.pop(ID_FIELD, p.id)), float(p.score), payload))
        return hits

    def delete(self, ids: Sequence[str] | None = None, where: Where | None = None) -> None:
        m = self._models
        if ids:
            self._client.delete(self.collection, points_selector=m.PointIdsList(points=[point_uuid(i) for i in ids]))
        if where:
            self._client.delete(self.collection, points_selector=m.FilterSelector(filter=self._filter(where)))

    def count(self, where: Where | None = None) -> int:
        return int(self._client.count(self.collection, count_filter=self._filter(where), exact=True).count)

    def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        records = self._client.retrieve(self.collection, ids=[point_uuid(i) for i in ids], with_payload=True)
        found: dict[str, dict[str, Any]] = {}
        for record in records:
            payload = dict(record.payload or {})
            found[str(payload.pop(ID_FIELD, record.id))] = payload
        return found

    def flush(self) -> None:
        return None

    def purge(self) -> None:
        """Nothing to do here: a Qdrant server drops deleted points from disk with its own optimiser."""
        return None

    def close(self) -> None:
        self._client.close()


_open_edge: dict[Path, EdgeVectorStore] = {}
_open_lock = threading.Lock()


def open_vector_store(settings: Settings, collection: str, dim: int, indexed: Sequence[str] = ()) -> VectorStore:
    """The store for `collection`: Qdrant Edge under the data home, or the configured Qdrant server."""
    if not collection.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"collection name {collection!r} may hold only letters, digits, '-' and '_'")
    cfg = settings.vectors
    if cfg.url:
        import os

        api_key = os.environ.get(cfg.api_key_env) or None
        return QdrantClientStore(cfg.url, collection, dim, indexed, api_key, cfg.hnsw_ef, cfg.exact)
    path = (settings.home / "vectors" / collection).resolve()
    with _open_lock:
        store = _open_edge.get(path)
        # One process may open the same shard from several servers (the router mounts them all).
        if store is None or store._closed:
            store = EdgeVectorStore(path, dim, indexed, cfg.hnsw_ef, cfg.exact)
            _open_edge[path] = store
        elif store.dim != dim:
            raise ValueError(f"collection {collection!r} holds {store.dim}-d vectors, not {dim}-d")
        else:
            with store._lock:
                store._refs += 1
        return store
