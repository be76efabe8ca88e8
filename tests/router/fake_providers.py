"""Real HTTP servers on 127.0.0.1 that speak the OpenAI and Anthropic wire formats.

Each server answers by script: per model, a queue of behaviours (answer, answer slowly, 429 with
Retry-After, 500, a body that is not JSON, hang past the client's timeout); when the queue is
empty it echoes the last user message. Every request body is kept for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    kind: str = "ok"  # ok | status | malformed | hang
    text: str | None = None
    status: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0
    input_tokens: int | None = None
    output_tokens: int | None = None


def ok(text: str | None = None, delay_s: float = 0.0, input_tokens: int | None = None, output_tokens: int | None = None) -> Behaviour:
    return Behaviour("ok", text=text, delay_s=delay_s, input_tokens=input_tokens, output_tokens=output_tokens)


def status(code: int, retry_after: str | None = None, message: str | None = None) -> Behaviour:
    return Behaviour("status", status=code, retry_after=retry_after, text=message)


def malformed() -> Behaviour:
    return Behaviour("malformed")


def hang(seconds: float) -> Behaviour:
    return Behaviour("hang", delay_s=seconds)


@dataclass
class Received:
    model: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class FakeLLMServer:
    """One provider. `kind` picks the wire format: 'openai' or 'anthropic'."""

    kind: str = "openai"
    scripts: dict[str, list[Behaviour]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}" + ("/v1" if self.kind == "openai" else "")

    def script(self, model: str, *behaviours: Behaviour) -> None:
        with self._lock:
            self.scripts.setdefault(model, []).extend(behaviours)

    def calls(self, model: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if model is None or r.model == model]

    def _next(self, model: str) -> Behaviour:
        with self._lock:
            queue = self.scripts.get(model) or []
            return queue.pop(0) if queue else Behaviour()

    def start(self) -> FakeLLMServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes; don't wait on delayed ACKs

            def log_message(self, *args: Any) -> None:  # keep test output clean
                return

            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                model = str(body.get("model", "?"))
                with fake._lock:
                    fake.received.append(Received(model, self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                expected = "/v1/chat/completions" if fake.kind == "openai" else "/v1/messages"
                if self.path != expected:
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                behaviour = fake._next(model)
                if behaviour.delay_s:
                    time.sleep(behaviour.delay_s)
                if behaviour.kind == "hang":
                    return self._send(200, {"error": "too late"})
                if behaviour.kind == "status":
                    headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
                    message = behaviour.text or f"scripted {behaviour.status}"
                    return self._send(behaviour.status, {"error": {"type": "scripted", "message": message}}, headers)
                if behaviour.kind == "malformed":
                    return self._send_raw(200, b'{"choices": [ {"message": oops', "application/json")
                messages = body.get("messages") or []
                last_user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
                text = behaviour.text if behaviour.text is not None else f"{model} says: {last_user}"
                prompt_chars = sum(len(str(m.get("content", ""))) for m in messages) + len(str(body.get("system", "")))
                in_tok = behaviour.input_tokens if behaviour.input_tokens is not None else prompt_chars // 4 + 1
                out_tok = behaviour.output_tokens if behaviour.output_tokens is not None else len(text) // 4 + 1
                if body.get("stream"):
                    return self._stream(model, text, in_tok, out_tok)
                return self._send(200, fake._answer(model, text, in_tok, out_tok))

            def _send(self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send_raw(code, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, code: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, model: str, text: str, in_tok: int, out_tok: int) -> None:
                pieces = [text[i:i + 8] for i in range(0, len(text), 8)] or [""]
                events: list[str] = []
                if fake.kind == "openai":
                    for piece in pieces:
                        events.append(json.dumps({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}))
                    events.append(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
                    events.append(json.dumps({"choices": [], "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok}}))
                    events.append("[DONE]")
                    lines = [f"data: {e}\n\n" for e in events]
                else:
                    lines = [f"event: message_start\ndata: {json.dumps({'type': 'message_start', 'message': {'model': model, 'usage': {'input_tokens': in_tok, 'output_tokens': 0}}})}\n\n"]
                    for piece in pieces:
                        lines.append(f"event: content_block_delta\ndata: {json.dumps({'type': 'content_block_delta', 'index': 0, 'delta': {'type': 'text_delta', 'text': piece}})}\n\n")
                    lines.append(f"event: message_delta\ndata: {json.dumps({'type': 'message_delta', 'delta': {'stop_reason': 'end_turn'}, 'usage': {'output_tokens': out_tok}})}\n\n")
                    lines.append(f"event: message_stop\ndata: {json.dumps({'type': 'message_stop'})}\n\n")
                data = "".join(lines).encode()
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def _answer(self, model: str, text: str, in_tok: int, out_tok: int) -> dict[str, Any]:
        if self.kind == "anthropic":
            return {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "usage": {"input_tokens": in_tok, "output_tokens": out_tok},
            }
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok, "total_tokens": in_tok + out_tok},
        }

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- fixtures the router tests import -----------------------------------------------------------

import pytest  # noqa: E402

from hydrabrain.shared.config import ModelPrice, ProviderConfig, Settings  # noqa: E402


@pytest.fixture
def openai_fake():
    fake = FakeLLMServer("openai").start()
    yield fake
    fake.stop()


@pytest.fixture
def anthropic_fake():
    fake = FakeLLMServer("anthropic").start()
    yield fake
    fake.stop()


def provider(fake: FakeLLMServer, name: str, *models: ModelPrice, timeout_s: float = 5.0, key_env: str | None = None) -> ProviderConfig:
    return ProviderConfig(name=name, kind=fake.kind, base_url=fake.base_url, api_key_env=key_env, timeout_s=timeout_s, models=list(models))


def with_providers(settings: Settings, *providers: ProviderConfig, **router: Any) -> Settings:
    """Settings whose router section uses these providers and overrides (fast retries for tests)."""
    section = settings.router.model_copy(update={"providers": list(providers), "backoff_s": 0.01, **router})
    return settings.model_copy(update={"router": section})
