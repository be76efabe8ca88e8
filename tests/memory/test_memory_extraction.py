"""With an LLM provider configured, remember asks it for facts; a failing provider loses nothing.

The provider is a real HTTP server on loopback speaking the OpenAI chat-completions API.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mcp import Client

from hydrabrain.servers.memory.server import build_server
from hydrabrain.shared.config import ModelPrice, ProviderConfig, Settings

pytestmark = pytest.mark.anyio
FACTS = {"facts": [{"subject": "search indexer", "predicate": "owner", "object": "Aiko"}]}


class FakeOpenAI(BaseHTTPRequestHandler):
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.status != 200:
            self.send_response(self.status)
            self.end_headers()
            return
        body = json.dumps({
            "id": "c1", "object": "chat.completion", "model": "fake-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(FACTS)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def provider(settings: Settings) -> Iterator[type[FakeOpenAI]]:
    handler = type("Handler", (FakeOpenAI,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.router.providers = [ProviderConfig(name="fake", kind="openai", base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                                                models=[ModelPrice(name="fake-mini", tasks={"extract": 1, "general": 1})])]
    settings.router.max_retries = 0
    yield handler
    server.shutdown()
    server.server_close()


async def test_remember_stores_the_facts_the_configured_llm_extracts(settings: Settings, provider: type[FakeOpenAI]) -> None:
    async with Client(build_server(settings)) as client:
        sid = (await client.call_tool("start_session", {"user": "dev"})).structured_content["session_id"]
        got = (await client.call_tool("remember", {"session_id": sid, "text": "Aiko owns the search indexer now."})).structured_content
        assert got["extracted"] is True
        assert [(f["subject"], f["predicate"], f["object"]) for f in got["facts"]] == [("search indexer", "owner", "Aiko")]


async def test_a_failing_llm_leaves_the_memory_stored_without_extra_facts(settings: Settings, provider: type[FakeOpenAI]) -> None:
    provider.status = 500
    async with Client(build_server(settings)) as client:
        sid = (await client.call_tool("start_session", {"user": "dev"})).structured_content["session_id"]
        result = await client.call_tool("remember", {"session_id": sid, "text": "Aiko owns the search indexer now."})
        assert not result.is_error
        assert result.structured_content["extracted"] is False and result.structured_content["facts"] == []
        session = json.loads((await client.read_resource(f"memory://session/{sid}")).contents[0].text)
        assert [e["text"] for e in session["episodes"]] == ["Aiko owns the search indexer now."]
