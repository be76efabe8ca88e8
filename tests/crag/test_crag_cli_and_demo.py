"""The command line (calibrate, retrieve), the LLM seams, and the demo over a real stdio transport."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from hydrabrain.servers.cli import main
from hydrabrain.servers.crag.evaluator import shipped_thresholds_path
from hydrabrain.servers.crag.server import build_server
from hydrabrain.shared.config import ModelPrice, ProviderConfig, Settings

from searx_server import SearchServer


# A fit sums floats in an order that differs between CPUs and thread counts: the sixth decimal moves.
FIT_TOLERANCE = 1e-4


def _same_fit(ours: object, shipped: object) -> bool:
    if isinstance(ours, dict) and isinstance(shipped, dict):
        return ours.keys() == shipped.keys() and all(_same_fit(ours[k], shipped[k]) for k in ours)
    if isinstance(ours, list) and isinstance(shipped, list):
        return len(ours) == len(shipped) and all(_same_fit(a, b) for a, b in zip(ours, shipped))
    if isinstance(ours, float) or isinstance(shipped, float):
        return ours == pytest.approx(shipped, rel=FIT_TOLERANCE, abs=FIT_TOLERANCE)
    return ours == shipped


def test_calibrate_reproduces_the_shipped_thresholds(tmp_path: Path, capsys: pytest.CaptureFixture[str], embedder_session: object) -> None:
    output = tmp_path / "thresholds.json"
    assert main(["crag", "calibrate", "--output", str(output)]) == 0
    ours, shipped = json.loads(output.read_text()), json.loads(shipped_thresholds_path().read_text())
    assert _same_fit(ours, shipped), f"calibration moved beyond {FIT_TOLERANCE}: {ours} vs {shipped}"
    printed = capsys.readouterr().out
    assert "set action accuracy" in printed and str(output) in printed


def test_calibrate_rejects_a_broken_dev_set_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "dev.json"
    broken.write_text('{"passages": []}')
    output = tmp_path / "thresholds.json"
    assert main(["crag", "calibrate", "--dev-set", str(broken), "--output", str(output)]) == 1
    assert "needs passages[] and sets[]" in capsys.readouterr().err
    assert not output.exists()


def test_retrieve_on_the_command_line_prints_the_action_context_and_trace(crag_settings: Settings, web: SearchServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRABRAIN_WEB_SEARCH_URL", web.url)
    monkeypatch.setenv("HYDRABRAIN_CRAG_ALLOW_PRIVATE_URLS", "true")
    assert main(["crag", "retrieve", "How many times does Quartz retry a failed job?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("action: correct") and "five times" in out and "[1] quartz-queue-md" in out
    assert main(["crag", "retrieve", "How often does Heron DB compact its log?", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["web_used"] and result["strips"][0]["citation"]["source"].startswith(web.url)


class _ChatServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that grades and rewrites by fixed rules."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                outer.prompts.append(prompt)
                if "web-search query" in prompt:
                    answer = "heron db log compaction interval"
                else:
                    document = prompt.split('"""')[1]
                    answer = "9" if "compact" in document.lower() else "1"
                reply = {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}], "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def chat_server() -> Iterator[_ChatServer]:
    server = _ChatServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.anyio
async def test_with_a_router_provider_the_query_is_rewritten_and_judged_by_the_llm(crag_settings: Settings, chat_server: _ChatServer) -> None:
    crag_settings.router.providers = [
        ProviderConfig(name="loopback", base_url=f"{chat_server.url}/v1", models=[ModelPrice(name="judge-1", tasks={"rewrite": 1, "classify": 1, "general": 1})])
    ]
    crag_settings.crag.evaluator = "router"
    async with Client(build_server(crag_settings)) as client:
        result = await client.call_tool("retrieve", {"question": "How often does Heron DB compact its log?"})
    assert not result.is_error, result.content
    out = result.structured_content
    assert out["rewritten_query"] == "heron db log compaction interval"
    assert "every 6 hours" in out["context"]
    assert any(p.startswith("You grade retrieval") and "Question: How often does Heron DB compact its log?" in p for p in chat_server.prompts)


@pytest.mark.anyio
async def test_the_backend_judge_speaks_the_openai_api_and_reports_when_it_is_down(crag_settings: Settings, chat_server: _ChatServer) -> None:
    host, port = chat_server.httpd.server_address[:2]
    crag_settings.crag.evaluator = "backend"
    crag_settings.backend.host, crag_settings.backend.port = str(host), int(port)
    documents = ["Heron DB compacts its log every 6 hours.", "Sourdough needs feeding."]
    async with Client(build_server(crag_settings)) as client:
        out = (await client.call_tool("evaluate", {"question": "How often does Heron DB compact?", "documents": documents})).structured_content
        assert out["scores"] == [0.9, 0.1] and out["action"] == "correct" and out["evaluator"] == "backend"
        chat_server.httpd.shutdown()
        chat_server.httpd.server_close()
        down = await client.call_tool("evaluate", {"question": "How often does Heron DB compact?", "documents": documents})
    assert down.is_error and "hydrabrain backend serve" in down.content[0].text


@pytest.mark.anyio
async def test_the_demo_runs_against_the_server_over_stdio(crag_settings: Settings, isolated_home: Path) -> None:
    from hydrabrain.servers.crag import demo

    env = {**os.environ, "HYDRABRAIN_HOME": str(isolated_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRABRAIN_WEB_SEARCH_URL", None)
    params = StdioServerParameters(command=sys.executable, args=["-m", "hydrabrain.servers.cli", "serve", "crag"], env=env)
    lines: list[str] = []
    async with Client(params) as client:
        await demo.run(client, lines.append)
    transcript = "\n".join(lines)
    assert "MaxSim" in transcript and "no web-search provider is configured" in transcript and "evaluate (2 documents)" in transcript
