"""The bi-temporal fact graph on both graph backends: embedded SQLite and a real Bolt server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mcp import Client

from hydrabrain.servers.memory.facts import FactFormatError, FactGraph, FactInput, parse_facts
from hydrabrain.servers.memory.server import build_server
from hydrabrain.servers.memory.timeutil import parse_time
from hydrabrain.shared.config import Settings
from hydrabrain.shared.graph import open_graph_store


@pytest.fixture(params=["sqlite", "bolt"])
def backend_settings(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    if request.param == "bolt":
        settings.graph.url = request.getfixturevalue("bolt_url")
        open_graph_store(settings, "memory").clear()  # the Bolt database is shared across tests
    yield settings


@pytest.fixture
def graph(backend_settings: Settings) -> Iterator[FactGraph]:
    store = open_graph_store(backend_settings, "memory")
    yield FactGraph(store)
    store.close()


def t(day: str) -> float:
    value = parse_time(day)
    assert value is not None
    return value


def home(city: str) -> FactInput:
    return FactInput("Ana", "lives in", city)


def test_a_newer_fact_supersedes_the_old_one_which_stays_true_as_of_its_own_time(graph: FactGraph) -> None:
    graph.assert_fact("u1", home("Lisbon"), t("2025-01-01"), t("2025-01-01"), "mem_a")
    graph.assert_fact("u1", home("Porto"), t("2025-06-01"), t("2025-06-02"), "mem_b")
    graph.assert_fact("u1", home("Braga"), t("2026-01-01"), t("2026-01-03"), "mem_c")

    assert [f.object for f in graph.facts("u1")] == ["Braga"]
    assert [f.object for f in graph.facts("u1", as_of=t("2025-07-01"))] == ["Porto"]
    assert [f.object for f in graph.facts("u1", as_of=t("2025-02-01"))] == ["Lisbon"]
    assert graph.facts("u1", as_of=t("2024-12-31")) == []
    history = graph.facts("u1", include_history=True)
    porto = next(f for f in history if f.object == "Porto")
    assert porto.valid_to == t("2026-01-01") and porto.invalidated_at == t("2026-01-03")
    assert porto.recorded_at == t("2025-06-02") and porto.source == "mem_b"


def test_a_fact_told_late_about_the_past_slots_into_the_timeline(graph: FactGraph) -> None:
    graph.assert_fact("u1", home("Braga"), t("2026-01-01"), t("2026-01-01"), "mem_c")
    graph.assert_fact("u1", home("Lisbon"), t("2025-01-01"), t("2026-02-01"), "mem_a")
    assert [f.object for f in graph.facts("u1")] == ["Braga"]
    assert [f.object for f in graph.facts("u1", as_of=t("2025-05-01"))] == ["Lisbon"]


def test_restating_a_current_fact_changes_nothing(graph: FactGraph) -> None:
    first, new = graph.assert_fact("u1", home("Lisbon"), t("2025-01-01"), t("2025-01-01"), "mem_a")
    again, new_again = graph.assert_fact("u1", FactInput("ana", "Lives  In", "lisbon"), t("2025-03-01"), t("2025-03-01"), "mem_b")
    assert new and not new_again and again.id == first.id
    assert len(graph.facts("u1", include_history=True)) == 1


def test_facts_asserted_at_the_same_instant_do_not_supersede_each_other(graph: FactGraph) -> None:
    graph.assert_fact("u1", FactInput("Ana", "knows", "Bea"), t("2025-01-01"), t("2025-01-01"), None)
    graph.assert_fact("u1", FactInput("Ana", "knows", "Caio"), t("2025-01-01"), t("2025-01-01"), None)
    assert sorted(f.object for f in graph.facts("u1")) == ["Bea", "Caio"]


def test_deleting_the_newest_fact_makes_the_previous_one_current_again(graph: FactGraph) -> None:
    graph.assert_fact("u1", home("Lisbon"), t("2025-01-01"), t("2025-01-01"), "mem_a")
    graph.assert_fact("u1", home("Porto"), t("2025-06-01"), t("2025-06-01"), "mem_b")
    graph.delete_sourced_from("u1", ["mem_b"], t("2025-07-01"))
    [fact] = graph.facts("u1", include_history=True)
    assert fact.object == "Lisbon" and fact.current and fact.invalidated_at is None


def test_users_share_nothing_in_the_graph(graph: FactGraph) -> None:
    graph.assert_fact("u1", home("Lisbon"), t("2025-01-01"), t("2025-01-01"), None)
    graph.assert_fact("u2", home("Porto"), t("2025-06-01"), t("2025-06-01"), None)
    assert [f.object for f in graph.facts("u1")] == ["Lisbon"]
    assert [f.object for f in graph.facts("u2")] == ["Porto"]
    deleted, _ = graph.delete_entity("u2", "Ana", t("2025-07-01"))
    assert len(deleted) == 1 and [f.object for f in graph.facts("u1")] == ["Lisbon"]


def test_malformed_facts_are_refused_with_the_field_named() -> None:
    with pytest.raises(FactFormatError, match=r"facts\[0\] lacks object"):
        parse_facts([{"subject": "a", "predicate": "b"}])
    with pytest.raises(FactFormatError, match=r"facts\[1\].subject must be a string"):
        parse_facts([{"subject": "a", "predicate": "b", "object": "c"}, {"subject": 3, "predicate": "b", "object": "c"}])
    with pytest.raises(FactFormatError, match="under 300"):
        parse_facts([{"subject": "a" * 400, "predicate": "b", "object": "c"}])
    with pytest.raises(FactFormatError, match=r"facts\[0\] must be an object"):
        parse_facts(["a likes b"])


@pytest.mark.anyio
async def test_the_server_keeps_fact_history_on_either_graph_backend(backend_settings: Settings) -> None:
    async with Client(build_server(backend_settings)) as client:
        sid = (await client.call_tool("start_session", {"user": "ana"})).structured_content["session_id"]
        for city, day in (("Lisbon", "2025-01-01"), ("Porto", "2025-06-01"), ("Braga", "2026-01-01")):
            result = await client.call_tool("remember", {"session_id": sid, "text": f"Ana moved to {city}.", "kind": "fact", "at": day,
                                                         "facts": [{"subject": "Ana", "predicate": "lives in", "object": city}]})
            assert not result.is_error
        now = await client.call_tool("recall", {"query": "Where does Ana live?", "user": "ana", "kinds": ["fact"]})
        assert [i["fact"]["object"] for i in now.structured_content["items"]] == ["Braga"]
        then = await client.call_tool("recall", {"query": "Where does Ana live?", "user": "ana", "kinds": ["fact"], "as_of": "2025-08-01"})
        assert [i["fact"]["object"] for i in then.structured_content["items"]] == ["Porto"]
