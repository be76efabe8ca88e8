"""Ranking for recall: one list of episodes, facts and lessons, ordered by how useful each is now.

The hybrid retriever fuses dense, BM25 and graph-neighbour candidates. On top of that, memory needs
what a document index does not: time. A candidate that did not exist yet `as_of` the question is
dropped; a fact no longer valid is dropped; an episode whose facts have all been superseded is
pushed down (it describes an old state of the world); newer episodes get a small recency boost.
Last, a relevance floor lets recall answer "nothing relevant" instead of padding the list: an item
stays only if it is close in meaning or covers the query's informative words, the words weighted by
how rare they are in this user's memory (a word no memory contains weighs most).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hydrabrain.shared.lexical import LexicalIndex, query_terms
from hydrabrain.shared.retrieval import coverage


@dataclass(frozen=True)
class RankingWeights:
    recency: float = 0.004  # about a quarter of a rank-1 RRF contribution for a brand-new item
    fact: float = 0.006  # a current fact states the answer outright; prefer it to the episode it came from
    lesson: float = 0.006  # a lesson distils several episodes; show it before any one of them
    entity: float = 0.008  # the query names the fact's subject or object
    stale: float = 0.5  # score factor for an episode whose facts are all superseded
    strong_cosine: float = 0.55  # this close in meaning is relevant whatever the words
    min_cosine: float = 0.3  # below this, even matching words are a coincidence
    min_coverage: float = 0.35  # share of the query's informative weight an item must cover


def recency(age_s: float, half_life_days: float) -> float:
    return 0.5 ** (max(0.0, age_s) / (half_life_days * 86400.0))


def term_weights(lexical: LexicalIndex, query: str, user: str, total: int, cap: int = 200) -> dict[str, float]:
    """IDF of each query word over this user's memory (document frequency counted up to `cap`)."""
    weights: dict[str, float] = {}
    for term in query_terms(query):
        df = len(lexical.search(term, k=cap, where={"user": user}))
        weights[term] = math.log((total + 1) / (df + 0.5))
    return weights


def weighted_coverage(weights: Mapping[str, float], text: str) -> float:
    total = sum(weights.values())
    if total <= 0:
        return 0.0
    got = sum(w for term, w in weights.items() if coverage([term], text) > 0)
    return got / total


def relevant(cosine: float | None, cover: float, w: RankingWeights) -> bool:
    if cosine is not None and cosine >= w.strong_cosine:
        return True
    if cosine is not None and cosine < w.min_cosine:
        return False
    return cover >= w.min_coverage


def entity_mentions(query: str, names: Sequence[str]) -> set[str]:
    """Entity names (case-folded) that occur in the query as whole words."""
    padded = " " + " ".join(query.casefold().replace("?", " ").replace(",", " ").replace(".", " ").split()) + " "
    return {n.casefold() for n in names if len(n) > 2 and f" {n.casefold()} " in padded}
