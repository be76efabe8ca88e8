"""The vector, graph and lexical stores behave the same on every backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from hydrabrain.shared.config import Settings
from hydrabrain.shared.graph import GraphError, GraphStore, open_graph_store
from hydrabrain.shared.lexical import open_lexical_index
from hydrabrain.shared.vectors import VectorPoint, open_vector_store


@pytest.fixture(params=["edge", "qdrant-client"])
def vector_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "qdrant-client":
        settings.vectors.url = ":memory:"
    return settings


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_vector_search_ranks_by_cosine_and_honours_filters(vector_settings: Settings) -> None:
    store = open_vector_store(vector_settings, "probe", dim=3, indexed=["kind"])
    store.upsert([
        VectorPoint("a", unit(1, 0, 0), {"kind": "x"}),
        VectorPoint("b", unit(0, 1, 0), {"kind": "y"}),
        VectorPoint("c", unit(1, 0.2, 0), {"kind": "y"}),
    ])
    assert [h.id for h in store.search(unit(1, 0, 0), k=2)] == ["a", "c"]
    assert [h.id for h in store.search(unit(1, 0, 0), k=5, where={"kind": "y"})] == ["c", "b"]
    assert store.count(where={"kind": ["x", "y"]}) == 3
    assert store.get(["a", "missing"]) == {"a": {"kind": "x"}}
    store.delete(ids=["a"])
    store.delete(where={"kind": "y"})
    assert store.count() == 0
    store.close()


def test_a_vector_of_the_wrong_size_is_refused(vector_settings: Settings) -> None:
    store = open_vector_store(vector_settings, "probe", dim=3)
    with pytest.raises(ValueError, match="expects 3"):
        store.upsert([VectorPoint("a", [1.0, 0.0], {})])
    store.close()


def test_the_embedded_vector_store_survives_a_reopen(settings: Settings) -> None:
    store = open_vector_store(settings, "durable", dim=3)
    store.upsert([VectorPoint("a", unit(1, 1, 0), {"note": "kept"})])
    store.close()
    again = open_vector_store(settings, "durable", dim=3)
    assert again.get(["a"]) == {"a": {"note": "kept"}}
    again.close()


@pytest.fixture(params=["sqlite", "bolt"])
def graph(request: pytest.FixtureRequest, settings: Settings) -> Iterator[GraphStore]:
    if request.param == "bolt":
        settings.graph.url = request.getfixturevalue("bolt_url")
    store = open_graph_store(settings, "shared_tests")
    store.clear()
    yield store
    store.clear()
    store.close()


def test_nodes_merge_properties_and_none_removes_one(graph: GraphStore) -> None:
    graph.upsert_node("a", "Entity", {"name": "A", "n": 1})
    graph.upsert_node("a", "Entity", {"n": None, "tags": ["x", "y"]})
    node = graph.get_node("a")
    assert node is not None and node.props == {"name": "A", "tags": ["x", "y"]}
    assert graph.get_node("missing") is None


def test_edges_filter_by_endpoint_relation_and_property(graph: GraphStore) -> None:
    for name in "abc":
        graph.upsert_node(name, "Entity", {"name": name})
    first = graph.add_edge("a", "works_at", "b", {"valid_to": "2026-01-01"})
    graph.add_edge("a", "knows", "c")
    assert [e.dst for e in graph.edges(src="a", rel="works_at")] == ["b"]
    assert [e.id for e in graph.edges(where={"valid_to": "2026-01-01"})] == [first]
    graph.update_edge(first, {"valid_to": None, "note": "moved"})
    assert graph.edges(src="a", rel="works_at")[0].props == {"note": "moved"}


def test_neighbours_are_found_with_their_hop_count(graph: GraphStore) -> None:
    for name in "abcd":
        graph.upsert_node(name, "Page")
    graph.add_edge("a", "links", "b")
    graph.add_edge("b", "links", "c")
    graph.add_edge("d", "cites", "a")
    assert graph.neighbors(["a"], depth=2) == {"b": 1, "c": 2, "d": 1}
    assert graph.neighbors(["a"], depth=2, rel="links") == {"b": 1, "c": 2}


def test_deleting_a_node_removes_its_edges(graph: GraphStore) -> None:
    graph.upsert_node("a", "Page")
    graph.upsert_node("b", "Page")
    graph.add_edge("a", "links", "b")
    graph.delete_node("b")
    assert graph.edges() == []
    assert [n.id for n in graph.nodes()] == ["a"]


def test_an_edge_to_a_missing_node_is_refused(graph: GraphStore) -> None:
    graph.upsert_node("a", "Page")
    with pytest.raises(GraphError, match="must exist"):
        graph.add_edge("a", "links", "nowhere")


def test_a_nested_property_is_refused_with_a_clear_error(graph: GraphStore) -> None:
    with pytest.raises(GraphError, match="cannot be stored"):
        graph.upsert_node("a", "Page", {"bad": {"nested": 1}})


def test_namespaces_do_not_see_each_other(settings: Settings, bolt_url: str) -> None:
    settings.graph.url = bolt_url
    one, two = open_graph_store(settings, "ns_one"), open_graph_store(settings, "ns_two")
    one.clear()
    two.clear()
    one.upsert_node("a", "Page")
    assert two.get_node("a") is None and two.nodes() == []
    one.clear()


def test_lexical_search_finds_rare_words_and_ignores_query_syntax(settings: Settings) -> None:
    index = open_lexical_index(settings, "probe")
    index.add_many([
        ("1", "The error code E1234 means the disk is full.", {"kind": "a"}),
        ("2", "Cats sleep most of the day.", {"kind": "b"}),
    ])
    assert [h.id for h in index.search("what is E1234?")] == ["1"]
    assert index.search('"unbalanced OR (quote* NEAR') == []
    assert [h.id for h in index.search("cats", where={"kind": "b"})] == ["2"]
    assert index.search("cats", where={"kind": "a"}) == []
    index.add("2", "Dogs bark.", {"kind": "b"})
    assert index.search("cats") == [] and index.count() == 2


def test_concurrent_lexical_writes_are_all_kept(settings: Settings) -> None:
    index = open_lexical_index(settings, "busy")

    def write(worker: int) -> None:
        for i in range(25):
            index.add(f"{worker}-{i}", f"note {worker} {i} alpha", {})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert index.count() == 100


def test_two_processes_take_turns_on_one_embedded_collection(settings: Settings) -> None:
    """Each server of mcp.json is its own process; wiki and crag (say) share the wiki's collection."""
    import subprocess
    import sys

    store = open_vector_store(settings, "turns", dim=3)
    store.upsert([VectorPoint("mine", unit(1, 0, 0), {})])
    other = subprocess.run(
        [sys.executable, "-c",
         "from hydrabrain.shared.config import load_settings\n"
         "from hydrabrain.shared.vectors import open_vector_store, VectorPoint\n"
         "s = open_vector_store(load_settings(), 'turns', dim=3)\n"
         "s.upsert([VectorPoint('theirs', [0.0, 1.0, 0.0], {})])\n"
         "print(s.count())\n"
         "s.close()\n"],
        capture_output=True, text=True, timeout=120,
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "2"
    assert store.count() == 2
    assert set(store.get(["mine", "theirs"])) == {"mine", "theirs"}
    store.close()


def test_a_burst_of_searches_starts_no_thread_per_call(settings: Settings) -> None:
    """The idle release (see the two-process test above) is one watcher per idle period, not a timer per call."""
    import threading

    store = open_vector_store(settings, "burst", dim=3)
    store.upsert([VectorPoint("a", unit(1, 0, 0), {})])
    before = threading.active_count()
    for _ in range(50):
        assert store.search(unit(1, 0, 0), k=1)[0].id == "a"
    assert threading.active_count() <= before
    store.close()


def test_one_encoder_pass_gives_the_pooled_vector_and_each_pieces_vector(settings: Settings) -> None:
    from hydrabrain.shared.embeddings import get_embedder

    embedder = get_embedder(settings)
    texts = ["Ben adopted a beagle puppy named Pickle, who chewed through three pairs of hiking boots.", "Hi Ana!"]
    vectors, pieces = embedder.embed_with_tokens(texts)  # one batch: the short text is padded inside the encoder
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-5)
    for text, p in zip(texts, pieces, strict=True):
        assert p.ids.tolist() == embedder.tokenizer.encode(text, add_special_tokens=False)  # no [CLS], [SEP] or padding
        assert p.vecs.shape == (len(p.ids), embedder.dim)
        np.testing.assert_allclose(np.linalg.norm(p.vecs.astype(np.float32), axis=1), 1.0, atol=1e-2)
    assert pieces[0].after(3).ids.tolist() == pieces[0].ids[3:].tolist()
