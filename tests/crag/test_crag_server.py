"""The CRAG server end to end: real local index, real MiniLM, a real web-search server on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from mcp import Client

from hydrabrain.servers.crag.server import build_server
from hydrabrain.shared.config import Settings

from searx_server import SearchServer

pytestmark = pytest.mark.anyio


async def _retrieve(settings: Settings, **arguments: object) -> dict:
    async with Client(build_server(settings)) as client:
        result = await client.call_tool("retrieve", arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def test_a_question_the_wiki_answers_is_correct_and_cited_by_wiki_source_id(crag_settings: Settings, web: SearchServer) -> None:
    out = await _retrieve(crag_settings, question="How long does the Lumen cache keep an entry before evicting it?")
    assert out["action"] == "correct"
    assert out["uncertain"] is False and out["web_used"] is False and out["rewritten_query"] is None
    assert web.queries == []  # a correct retrieval never goes to the web
    assert "90 seconds" in out["context"]
    assert {s["citation"]["source"] for s in out["strips"]} == {"lumen-cache-md"}
    assert out["context_tokens"] <= 1500
    assert [t["step"] for t in out["trace"]][:2] == ["retrieve", "evaluate"]


async def test_content_from_a_compiled_wiki_page_is_cited_by_its_slug(crag_settings: Settings) -> None:
    out = await _retrieve(crag_settings, question="Where does the Lumen dashboard live?")
    assert out["action"] == "correct"
    assert "lumen.internal/dash" in out["context"]
    assert out["strips"][0]["citation"] == {"source": "page:lumen-overview", "origin": "wiki", "title": "Lumen overview"}


async def test_a_question_only_the_web_answers_is_rewritten_searched_fetched_and_cited_by_url(crag_settings: Settings, web: SearchServer) -> None:
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert out["action"] == "incorrect"
    assert out["web_used"] is True and out["web_error"] is None
    assert out["rewritten_query"] == "often heron db compact log" and web.queries == ["often heron db compact log"]
    assert "every 6 hours" in out["context"]
    sources = {s["citation"]["source"] for s in out["strips"]}
    assert sources == {f"{web.url}/pages/heron-db.html"}
    # The page was fetched and cleaned: page text beyond the snippet is there, markup and scripts are not.
    assert "compaction_interval" in out["context"] and "<p>" not in out["context"] and "tracking" not in out["context"]
    # The unrelated page never makes it into the context.
    assert "sourdough" not in out["context"].lower()


async def test_without_a_provider_the_call_succeeds_with_the_best_internal_context_flagged_uncertain(settings: Settings, crag_settings: Settings) -> None:
    crag_settings.crag.web_search_url = None
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert out["action"] == "incorrect"
    assert out["uncertain"] is True and out["web_used"] is False
    assert "HYDRABRAIN_WEB_SEARCH_URL" in out["web_error"]
    assert out["strips"], "the best internal context comes back"
    assert all(s["citation"]["origin"] == "wiki" for s in out["strips"])  # no invented sources


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("slow", "did not answer within"), ("error", "HTTP 500"), ("garbage", "not JSON"), ("wrongshape", "not in the SearXNG")],
)
async def test_a_provider_that_times_out_fails_or_talks_garbage_is_reported_and_never_fails_the_call(
    crag_settings: Settings, web: SearchServer, mode: str, reason: str
) -> None:
    crag_settings.crag.web_search_url = f"{web.url}/{mode}"
    crag_settings.crag.web_timeout_s = 0.5
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?", token_budget=200)
    assert reason in out["web_error"]
    assert out["uncertain"] is True and out["web_used"] is False
    assert all(s["citation"]["origin"] == "wiki" for s in out["strips"])
    assert any(reason in t["detail"] for t in out["trace"])


async def test_an_ambiguous_retrieval_combines_internal_strips_with_a_web_search(crag_settings: Settings, web: SearchServer) -> None:
    # Thresholds so strict that a relevant wiki chunk lands between them.
    crag_settings.crag.upper_threshold = 0.9999
    crag_settings.crag.lower_threshold = 0.05
    out = await _retrieve(crag_settings, question="How long does the Lumen cache keep an entry before evicting it?")
    assert out["action"] == "ambiguous" and out["uncertain"] is True and out["confidence"] == 0.5
    assert web.queries and out["rewritten_query"] == web.queries[0]
    assert "90 seconds" in out["context"]
    assert out["web_used"] is True
    # Both kinds of evidence were judged together; the web page on the same cache passed the floor
    # and competed with the wiki's strips for the budget.
    web_docs = [d for d in out["documents"] if d["citation"]["origin"] == "web"]
    assert any(d["citation"]["title"] == "Tuning the Lumen cache" and d["score"] >= 0.05 for d in web_docs)
    assert any(t["step"] == "evaluate" and t["detail"].startswith("web:") for t in out["trace"])


async def test_allow_web_false_keeps_the_call_internal(crag_settings: Settings, web: SearchServer) -> None:
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?", allow_web=False)
    assert web.queries == [] and out["web_used"] is False and "allow_web" in out["web_error"]


async def test_the_brave_api_shape_is_searched_with_its_subscription_token(crag_settings: Settings, web: SearchServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from searx_server import BRAVE_TOKEN

    crag_settings.crag.web_search_provider = "brave"
    monkeypatch.setenv("HYDRABRAIN_WEB_SEARCH_KEY", BRAVE_TOKEN)
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert out["web_used"] is True and "every 6 hours" in out["context"]

    monkeypatch.setenv("HYDRABRAIN_WEB_SEARCH_KEY", "wrong")
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert "HTTP 401" in out["web_error"]

    monkeypatch.delenv("HYDRABRAIN_WEB_SEARCH_KEY")
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert "$HYDRABRAIN_WEB_SEARCH_KEY" in out["web_error"]


async def test_injected_instructions_in_a_fetched_page_are_flagged_not_followed(crag_settings: Settings) -> None:
    out = await _retrieve(crag_settings, question="How far does a Heron DB follower lag behind the leader in replication?")
    flagged = [s for s in out["strips"] if s["flags"]]
    assert flagged and all("ignore all previous instructions" in s["text"] for s in flagged)
    assert any("flagged" in t["detail"] for t in out["trace"])
    assert "one segment" in out["context"]


async def test_web_results_on_private_addresses_are_refused_unless_allowed(crag_settings: Settings) -> None:
    crag_settings.crag.allow_private_urls = False
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    fetch_steps = [t["detail"] for t in out["trace"] if t["step"] == "fetch"]
    assert fetch_steps and all("crag.allow_private_urls" in d for d in fetch_steps)
    # Only the search snippet is used then: the page text beyond it never arrives.
    assert "compaction_interval" not in out["context"]


async def test_a_web_result_with_an_impossible_host_is_skipped_not_fatal(crag_settings: Settings, web: SearchServer) -> None:
    web.extra_results = [{"url": "http://" + "a" * 64 + ".example/heron", "title": "Heron DB notes", "content": "Heron DB compacts its log."},
                         {"url": "http://[::1/heron", "title": "Heron DB", "content": "Heron DB compacts its log."}]
    out = await _retrieve(crag_settings, question="How often does Heron DB compact its log?")
    assert out["web_used"] and out["strips"]
    assert any("not a valid" in t["detail"] for t in out["trace"] if t["step"] == "fetch")


async def test_the_token_budget_caps_the_context(crag_settings: Settings) -> None:
    out = await _retrieve(crag_settings, question="What does the Lumen cache do and how large can it grow?", token_budget=32)
    assert 0 < out["context_tokens"] <= 32


async def test_evaluate_scores_each_document_and_gives_the_action(crag_settings: Settings) -> None:
    documents = [
        "Sourdough starter needs daily feeding at room temperature.",
        "Quartz retries a failed job five times, with exponential backoff starting at two seconds.",
    ]
    async with Client(build_server(crag_settings)) as client:
        result = await client.call_tool("evaluate", {"question": "How many times does Quartz retry a failed job?", "documents": documents})
        assert not result.is_error
        out = result.structured_content
        assert out["scores"][1] > out["upper_threshold"] > out["lower_threshold"] > out["scores"][0]
        assert out["action"] == "correct" and out["evaluator"] == "minilm"

        result = await client.call_tool("evaluate", {"question": "How many times does Quartz retry a failed job?", "documents": documents[:1]})
        assert result.structured_content["action"] == "incorrect"


async def test_resources_show_the_thresholds_and_the_evaluator(crag_settings: Settings) -> None:
    crag_settings.crag.upper_threshold = 0.8
    async with Client(build_server(crag_settings)) as client:
        thresholds = json.loads((await client.read_resource("crag://thresholds")).contents[0].text)
        description = (await client.read_resource("crag://evaluator")).contents[0].text
    assert thresholds["upper_threshold"] == 0.8  # the setting overrides the calibrated value
    assert thresholds["lower_threshold"] == thresholds["calibration"]["lower"]
    assert thresholds["calibration"]["dev_pairs"] >= 100
    assert "MaxSim" in description and "0.800" in description


async def test_bad_input_is_an_actionable_error(crag_settings: Settings) -> None:
    async with Client(build_server(crag_settings)) as client:
        empty = await client.call_tool("retrieve", {"question": "   "})
        unknown = await client.call_tool("retrieve", {"question": "Lumen eviction?", "sources": ["postgres"]})
    assert empty.is_error and "question is empty" in empty.content[0].text
    assert unknown.is_error and "qdrant:<collection>" in unknown.content[0].text


async def test_memory_and_a_named_qdrant_collection_are_sources_too(crag_settings: Settings) -> None:
    from hydrabrain.shared.embeddings import get_embedder
    from hydrabrain.shared.lexical import open_lexical_index
    from hydrabrain.shared.retrieval import HybridRetriever
    from hydrabrain.shared.vectors import VectorPoint, open_vector_store

    embedder = get_embedder(crag_settings)
    memory = HybridRetriever(embedder, open_vector_store(crag_settings, "memory", embedder.dim, ("user",)), open_lexical_index(crag_settings, "memory"))
    memory.index([("ep-1", "The team agreed that the Falcon API gateway rejects requests larger than 8 MB.", {"user": "ana"}),
                  ("ep-2", "Bo's private note: the Falcon API gateway admin password is in the red notebook.", {"user": "bo"})])
    notes = open_vector_store(crag_settings, "notes", embedder.dim)
    text = "The Osprey build server keeps build logs for 30 days."
    notes.upsert([VectorPoint("n1", embedder.embed_one(text), {"text": text, "url": "https://notes.example/osprey"})])

    out = await _retrieve(crag_settings, question="What is the largest request the Falcon API gateway accepts?", sources=["memory"], user="ana")
    assert out["action"] == "correct" and out["strips"][0]["citation"] == {"source": "memory:ep-1", "origin": "memory", "title": ""}
    # one user's question never surfaces another user's memories, through either spelling of the source
    for source in ("memory", "qdrant:memory"):
        out = await _retrieve(crag_settings, question="Falcon API gateway admin password", sources=[source], user="ana", allow_web=False)
        assert "notebook" not in out["context"] and all(s["citation"]["source"] != "memory:ep-2" for s in out["strips"])
    async with Client(build_server(crag_settings)) as client:
        nobody = await client.call_tool("retrieve", {"question": "Falcon API gateway", "sources": ["memory"]})
    assert nobody.is_error and "name the user" in nobody.content[0].text
    out = await _retrieve(crag_settings, question="How long does the Osprey build server keep build logs?", sources=["qdrant:notes", "wiki"])
    assert out["action"] == "correct"
    assert out["strips"][0]["citation"]["source"] == "https://notes.example/osprey"
