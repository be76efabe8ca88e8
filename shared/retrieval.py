"""Hybrid retrieval: dense, lexical and graph-neighbour candidates fused by reciprocal rank, then reranked.

Dense search finds paraphrases, BM25 finds rare exact words (names, identifiers, error codes) that a
384-d sentence vector blurs, and the graph brings in what the best hits link to. Reciprocal rank
fusion needs no score calibration between them. The rerank then rewards candidates that cover more
of the query's content words, which fusion alone cannot see.

Each indexed item is stored under the same id in the vector store (payload holds ``text``) and the
lexical index, so fusion can join them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hydrabrain.shared.embeddings import Embedder
from hydrabrain.shared.lexical import LexicalIndex, query_terms
from hydrabrain.shared.vectors import VectorPoint, VectorStore

RRF_K = 60
NeighbourFn = Callable[[list[str]], Mapping[str, int]]


@dataclass
class RetrievalHit:
    id: str
    score: float
    text: str
    payload: dict[str, Any]
    signals: dict[str, float] = field(default_factory=dict)  # per-retriever rank contribution, for explanations


@dataclass
class RetrievalWeights:
    dense: float = 1.0
    lexical: float = 1.0
    graph: float = 0.5
    coverage: float = 0.012  # about one RRF rank-1 contribution for full coverage of the query words
    graph_seeds: int = 3


def coverage(terms: Sequence[str], text: str) -> float:
    """Share of the query's content words that occur in `text` (prefix match tolerates plurals)."""
    if not terms:
        return 0.0
    return coverage_of(terms, text_words(text))


class TextWords(frozenset):
    """A text's content words (``set(query_terms(text))``), with every prefix of four or more letters
    of its words, so the prefix match in `coverage_of` is set lookups instead of a scan per term."""

    prefixes: frozenset[str]

    @classmethod
    def of(cls, words) -> TextWords:
        out = cls(words)
        out.prefixes = frozenset(w[:i] for w in out if len(w) > 3 for i in range(4, len(w) + 1))
        return out


@functools.lru_cache(maxsize=16384)
def text_words(text: str) -> TextWords:
    """A text's words, kept for texts seen again: the same turns and pages come back as candidates
    query after query, and splitting them and scanning for prefixes was a third of a recall's time."""
    return TextWords.of(query_terms(text))


def coverage_of(terms: Sequence[str], words: set[str]) -> float:
    """`coverage` against a text's words already split (``set(query_terms(text))`` or `text_words`).

    A term counts when the text has it, or a longer word that starts with it, or (terms over three
    letters) a word of four or more letters that it starts with: plurals and stems either way."""
    if not terms:
        return 0.0
    if not isinstance(words, TextWords):
        words = TextWords.of(words)
    hit = 0
    for term in terms:
        if term in words:
            hit += 1
        elif len(term) > 3:
            hit += term in words.prefixes or any(term[:i] in words for i in range(4, len(term)))
    return hit / len(terms)


class HybridRetriever:
    def __init__(
        self,
        embedder: Embedder,
        vectors: VectorStore,
        lexical: LexicalIndex,
        neighbours: NeighbourFn | None = None,
        weights: RetrievalWeights | None = None,
    ) -> None:
        self.embedder = embedder
        self.vectors = vectors
        self.lexical = lexical
        self.neighbours = neighbours
        self.weights = weights or RetrievalWeights()

    def index(self, items: Sequence[tuple[str, str, Mapping[str, Any]]], vectors: np.ndarray | None = None) -> None:
        """Store (id, text, payload) items in both indexes; `vectors` may be given if already embedded."""
        if not items:
            return
        if vectors is None:
            vectors = self.embedder.embed([text for _, text, _ in items])
        self.vectors.upsert(VectorPoint(i, v, {**dict(p), "text": t}) for (i, t, p), v in zip(items, vectors, strict=True))
        self.lexical.add_many((i, t, p) for i, t, p in items)

    def remove(self, ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None) -> None:
        self.vectors.delete(ids=list(ids) if ids else None, where=where)
        self.lexical.delete(doc_ids=ids, where=where)

    def purge(self) -> None:
        """Make earlier removals reach the files of both indexes (for deletions that must not linger)."""
        self.vectors.purge()
        self.lexical.purge()

    def dense_only(self, query: str, k: int = 8, where: Mapping[str, Any] | None = None) -> list[RetrievalHit]:
        """Plain dense top-k on the same store: the anchor hybrid retrieval is measured against."""
        qv = self.embedder.embed_one(query)
        return [
            RetrievalHit(h.id, h.score, str(h.payload.get("text", "")), h.payload, {"dense": h.score})
            for h in self.vectors.search(qv, k, where)
        ]

    def search(self, query: str, k: int = 8, where: Mapping[str, Any] | None = None, fetch_k: int | None = None) -> list[RetrievalHit]:
        fetch_k = fetch_k or max(4 * k, 20)
        w = self.weights
        qv = self.embedder.embed_one(query)
        dense = self.vectors.search(qv, fetch_k, where)
        lexical = self.lexical.search(query, fetch_k, where)

        fused: dict[str, float] = {}
        signals: dict[str, dict[str, float]] = {}
        payloads: dict[str, dict[str, Any]] = {}
        dense_scores: dict[str, float] = {}
        for rank, hit in enumerate(dense):
            contribution = w.dense / (RRF_K + rank + 1)
            fused[hit.id] = fused.get(hit.id, 0.0) + contribution
            signals.setdefault(hit.id, {})["dense"] = contribution
            payloads[hit.id] = hit.payload
            dense_scores[hit.id] = hit.score
        for rank, hit in enumerate(lexical):
            contribution = w.lexical / (RRF_K + rank + 1)
            fused[hit.id] = fused.get(hit.id, 0.0) + contribution
            signals.setdefault(hit.id, {})["lexical"] = contribution

        if self.neighbours is not None and fused and w.graph > 0:
            seeds = sorted(fused, key=fused.__getitem__, reverse=True)[: w.graph_seeds]
            for node, hops in self.neighbours(seeds).items():
                contribution = w.graph / (RRF_K + 10 * hops)
                fused[node] = fused.get(node, 0.0) + contribution
                signals.setdefault(node, {})["graph"] = contribution

        missing = [i for i in fused if i not in payloads]
        if missing:
            payloads.update(self.vectors.get(missing))
        if where:
            # Graph neighbours were found without the filter; apply it now.
            for item_id in list(fused):
                payload = payloads.get(item_id)
                if payload is None or not _matches(payload, where):
                    fused.pop(item_id)

        terms = query_terms(query)
        hits: list[RetrievalHit] = []
        for item_id, score in fused.items():
            payload = payloads.get(item_id)
            if payload is None:
                continue  # known to one index only (being written or removed right now)
            text = str(payload.get("text", ""))
            cover = coverage(terms, text)
            sig = dict(signals.get(item_id, {}))
            sig["coverage"] = cover
            if item_id in dense_scores:
                sig["cosine"] = dense_scores[item_id]
            hits.append(RetrievalHit(item_id, score + w.coverage * cover, text, payload, sig))
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[:k]


def _matches(payload: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    for key, value in where.items():
        have = payload.get(key)
        if isinstance(value, (list, tuple, set)):
            if have not in value:
                return False
        elif have != value:
            return False
    return True
