"""The OpenAI-compatible API served by uvicorn on loopback, spoken to through httpx."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from backend_http import served

from hydrabrain.inference.api import build_app
from hydrabrain.inference.engine import Engine

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def backend(tiny):
    engine = Engine(tiny.runner, tiny.tokenizer, num_blocks=128, stats=tiny.stats, prefill_chunk=64, recent=32)
    with served(build_app(engine, tiny.tokenizer, MODEL, default_max_tokens=24)) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, engine


def _events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_the_model_list_names_the_served_model(backend):
    client, _ = backend
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_a_completion_returns_text_usage_and_a_finish_reason(backend, tiny):
    client, _ = backend
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["finish_reason"] in {"length", "stop"} and isinstance(choice["text"], str)
    prompt_tokens = len(tiny.tokenizer.encode("Once upon a time", add_special_tokens=False))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["total_tokens"] == prompt_tokens + body["usage"]["completion_tokens"]


def test_a_streamed_chat_completion_sends_the_same_text_in_chunks_then_done(backend):
    client, _ = backend
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == whole["usage"]


def test_a_streamed_completion_ends_with_done(backend):
    client, _ = backend
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 5, "stream": True, "seed": 1}) as response:
        events = _events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in {"length", "stop"}


@pytest.mark.parametrize(
    ("path", "payload", "status", "param", "code"),
    [
        ("/v1/chat/completions", {"model": "gpt-nothing", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
        ("/v1/completions", {"model": MODEL, "prompt": "x " * 1100}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 7}, 400, "temperature", None),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_budget": 3}, 400, "kv_budget", "invalid_request"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_budget": 64, "kv_policy": "lru"}, 400, "kv_policy", "invalid_request"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_budget": 64, "kv_policy": "heads"}, 400, "kv_policy", "invalid_request"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 40, "kv_document_tokens": 400}, 400, "kv_document_tokens", "invalid_request"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 40, "kv_document_tokens": 30, "kv_spill": True}, 400, "kv_spill", "invalid_request"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 40, "kv_budget": 36, "kv_policy": "recent", "kv_document_tokens": 30,
                             "kv_spill": True}, 400, "kv_spill", "invalid_request"),
    ],
)
def test_bad_requests_get_openai_shaped_errors_with_the_right_status(backend, path, payload, status, param, code):
    client, _ = backend
    response = client.post(path, json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_malformed_json_and_unknown_routes_are_reported_in_the_same_shape(backend):
    client, _ = backend
    bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = client.get("/v1/embeddings")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong_method = client.get("/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(backend):
    client, engine = backend
    pool = engine.cache.pool
    request = {"model": MODEL, "prompt": "word " * 200, "max_tokens": 700, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=request) as response:
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break
        assert pool.num_used > 0  # the request holds blocks while it streams
    deadline = time.monotonic() + 60
    while pool.num_used and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.num_used == 0
    assert not engine.running


def test_a_compacted_request_reports_its_policy_and_its_peak_and_steady_kv_in_the_usage(backend):
    client, engine = backend
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 300, "max_tokens": 8, "temperature": 0,
                                                "kv_budget": 64, "kv_policy": "snapkv"}).json()
    kv = body["usage"]["kv"]
    assert kv["policy"] == "snapkv" and kv["blocks_freed"] > 0 and kv["compactions"] >= 1
    per_block = engine.cache.bytes_per_block
    assert kv["bytes_peak"] >= 300 // 16 * per_block  # a prompt-end policy holds the whole prompt first
    assert kv["bytes_steady"] <= (64 + 64 + 128) // 16 * per_block + per_block
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).json()
    assert "kv" not in plain["usage"]  # no budget, no compaction to report


def test_a_question_after_a_spilled_document_reports_the_host_bytes_it_kept(backend):
    client, engine = backend
    document = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 300, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 300 + "what was said?", "max_tokens": 4, "temperature": 0,
                                                "kv_budget": 64, "kv_policy": "snapkv", "kv_document_tokens": document, "kv_spill": True}).json()
    kv, prompt = body["usage"]["kv"], body["usage"]["prompt_tokens"]
    per_token = 2 * engine.cache.head_dim * sum(engine.cache.kv_heads) * 2  # K and V of every KV head, in half precision
    assert kv["bytes_host"] == prompt * per_token and kv["compactions"] >= 2  # the document's pass, then the question's
    assert kv["bytes_steady"] <= (64 + 64 + 128) // 16 * engine.cache.bytes_per_block + engine.cache.bytes_per_block


def test_a_huge_seed_and_an_oversized_body_get_clear_4xx_errors(backend):
    client, _ = backend
    seeded = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "seed": 2**64})
    assert seeded.status_code == 400 and seeded.json()["error"]["param"] == "seed"
    huge = client.post("/v1/completions", content=b'{"model": "tiny-llama", "prompt": "' + b"a" * 4_100_000 + b'"}',
                       headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_with_api_tokens_the_backend_wants_a_bearer_key_with_the_completion_scope(tiny, settings):
    from hydrabrain.shared.auth import StoreTokenVerifier, TokenStore

    store = TokenStore(settings.home)
    good, _ = store.create("alice", "router:complete")
    reader, _ = store.create("bob", "memory:read")
    engine = Engine(tiny.runner, tiny.tokenizer, num_blocks=64, stats=tiny.stats, prefill_chunk=64, recent=32)
    app = build_app(engine, tiny.tokenizer, MODEL, default_max_tokens=4, token_verifier=StoreTokenVerifier(store))
    with served(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        request = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
        missing = client.post("/v1/completions", json=request)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert client.post("/v1/completions", json=request, headers={"Authorization": "Bearer hbt_nope_nope"}).status_code == 401
        scoped = client.post("/v1/completions", json=request, headers={"Authorization": f"Bearer {reader}"})
        assert scoped.status_code == 403 and "router:complete" in scoped.json()["error"]["message"]
        ok = client.post("/v1/completions", json=request, headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_a_server_that_spills_by_default_spills_budgeted_query_aware_requests_only(tiny):
    engine = Engine(tiny.runner, tiny.tokenizer, num_blocks=128, stats=tiny.stats, prefill_chunk=64, recent=32)
    with served(build_app(engine, tiny.tokenizer, MODEL, default_kv_budget=64, default_kv_spill=True)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        def kv(**fields):
            body = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 300, "max_tokens": 4, **fields})
            assert body.status_code == 200, body.text
            return body.json()["usage"]["kv"]

        spilled = kv(kv_policy="snapkv")
        assert spilled["bytes_host"] > 0 and spilled["bytes_peak"] < 300 // 16 * engine.cache.bytes_per_block  # one chunk, not the prompt
        assert kv(kv_policy="h2o")["bytes_host"] == 0  # a streaming policy has nothing to choose again: not spilled, not refused
        assert kv(kv_policy="snapkv", kv_spill=False)["bytes_host"] == 0


def test_bound_to_loopback_a_request_naming_another_host_is_refused(tiny):
    engine = Engine(tiny.runner, tiny.tokenizer, num_blocks=64, stats=tiny.stats, prefill_chunk=64, recent=32)
    app = build_app(engine, tiny.tokenizer, MODEL, allowed_hosts=["127.0.0.1:*", "localhost:*"])
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/models").status_code == 200
        rebound = client.get("/v1/models", headers={"Host": "attacker.example:8808"})
        assert rebound.status_code == 421 and rebound.json()["error"]["code"] == "invalid_host"


def _slow_post(url: str, path: str) -> bytes:
    """A client that announces a body and sends a sliver of it, then stalls: returns the raw response."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"".encode())
        return b"".join(iter(lambda: sock.recv(4096), b""))  # the server answers and closes


def test_a_body_that_never_finishes_arriving_gets_408(tiny):
    engine = Engine(tiny.runner, tiny.tokenizer, num_blocks=64, stats=tiny.stats, prefill_chunk=64, recent=32)
    with served(build_app(engine, tiny.tokenizer, MODEL, body_timeout_s=1)) as url:
        answer = _slow_post(url, "/v1/completions")
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
