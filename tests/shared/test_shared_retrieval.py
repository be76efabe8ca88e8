"""Hybrid retrieval over the real MiniLM, Qdrant Edge and FTS5."""

from __future__ import annotations

import numpy as np
import pytest

from hydrabrain.shared.config import Settings
from hydrabrain.shared.embeddings import get_embedder
from hydrabrain.shared.lexical import open_lexical_index
from hydrabrain.shared.retrieval import HybridRetriever
from hydrabrain.shared.vectors import open_vector_store

DOCS = [
    ("d1", "Qdrant Edge is an in-process vector search engine made by the Qdrant team.", {"kind": "page"}),
    ("d2", "Error ZX-4471 is raised when the ingest queue overflows.", {"kind": "page"}),
    ("d3", "The cat slept on the warm windowsill all afternoon.", {"kind": "chunk"}),
    ("d4", "Reciprocal rank fusion merges ranked lists without calibrating their scores.", {"kind": "chunk"}),
]


@pytest.fixture
def retriever(settings: Settings) -> HybridRetriever:
    r = HybridRetriever(get_embedder(settings), open_vector_store(settings, "docs", 384, indexed=["kind"]), open_lexical_index(settings, "docs"))
    r.index(DOCS)
    return r


def test_embeddings_are_normalised_and_cached_by_content(settings: Settings) -> None:
    embedder = get_embedder(settings)
    vectors = embedder.embed(["a sentence", "another one", "a sentence"])
    assert vectors.shape == (3, 384)
    assert abs(float(vectors[0] @ vectors[0]) - 1.0) < 1e-4
    assert (vectors[0] == vectors[2]).all()
    assert embedder.count_tokens("hello world") == 2


def test_texts_of_mixed_lengths_are_batched_with_similar_ones_and_come_back_in_the_order_given(settings: Settings) -> None:
    from hydrabrain.shared.embeddings import length_groups

    lengths = [3, 40, 38, 5, 90, 4, 36, 33, 80]
    groups = length_groups(lengths, batch_size=2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) <= 2 and min(lengths[i] for i in g) >= 0.8 * lengths[g[0]] for g in groups)
    assert groups[0] == [4, 8] and [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)

    embedder = get_embedder(settings)
    texts = ["ok", "a much longer sentence about the release schedule of the parser and who signs it off", "yes", "the parser ships on friday"]
    pooled, pieces = embedder.embed_with_tokens(texts)
    one_batch = embedder.model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(pooled, one_batch, atol=1e-5)
    assert [len(p.ids) for p in pieces] == [embedder.count_tokens(t) for t in texts]


def test_a_rare_identifier_is_found_by_the_lexical_side(retriever: HybridRetriever) -> None:
    hits = retriever.search("what does ZX-4471 mean", k=2)
    assert hits[0].id == "d2"
    assert "lexical" in hits[0].signals


def test_a_paraphrase_is_found_by_the_dense_side(retriever: HybridRetriever) -> None:
    assert retriever.search("embedded database for similarity search", k=1)[0].id == "d1"


def test_filters_apply_to_every_retriever(retriever: HybridRetriever) -> None:
    hits = retriever.search("cat windowsill", k=4, where={"kind": "page"})
    assert hits and all(h.payload["kind"] == "page" for h in hits)


def test_graph_neighbours_of_the_best_hits_join_the_candidates(settings: Settings) -> None:
    links = {"d2": {"d4": 1}}
    r = HybridRetriever(
        get_embedder(settings), open_vector_store(settings, "linked", 384), open_lexical_index(settings, "linked"),
        neighbours=lambda ids: {n: h for i in ids for n, h in links.get(i, {}).items()},
    )
    r.index(DOCS)
    hits = r.search("ZX-4471", k=4)
    assert "graph" in next(h for h in hits if h.id == "d4").signals


def test_removed_items_are_no_longer_returned(retriever: HybridRetriever) -> None:
    retriever.remove(ids=["d2"])
    assert all(h.id != "d2" for h in retriever.search("ZX-4471", k=4))


def test_cached_text_words_match_a_fresh_split_in_coverage_prefixes_included() -> None:
    import random

    from hydrabrain.shared.lexical import query_terms
    from hydrabrain.shared.retrieval import coverage_of, text_words

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcde") for _ in range(rng.randint(2, 8))) for _ in range(300)]  # many shared prefixes
    for _ in range(2000):
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 20)))
        terms = query_terms(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6))))
        assert coverage_of(terms, text_words(text)) == coverage_of(terms, set(query_terms(text)))
    assert coverage_of(["moving"], text_words("She moved to Paris")) == 0.0
    assert coverage_of(["paint", "paris"], text_words("paintings of Paris")) == 1.0
