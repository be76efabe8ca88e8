"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (with SSE).

One worker thread owns the engine and steps it while any request is live; each HTTP request waits
on its own asyncio queue. Errors use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the matching status. A client that goes away (mid-stream or while waiting for a
whole completion) cancels its request, and the engine gives its blocks back on the next step.
Extensions: ``kv_budget`` (tokens) sets the request's KV budget and ``kv_policy`` which tokens
survive compaction; ``kv_document_tokens`` marks the prompt's first N tokens as a document read before
the question (the selection then happens where it ends), and ``kv_spill`` keeps the prompt's K/V in
host memory so that the question chooses the survivors again. The usage of a compacted request
reports its KV bytes at peak and in steady state, and the host bytes it spilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hydrabrain.inference.engine import Engine, RequestOutput, RequestRejected, SamplingParams
from hydrabrain.inference.policies import UnknownPolicy, parse_policy


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}, status_code=self.status)


# --- the worker ---------------------------------------------------------------------------------


class AsyncEngine:
    """The engine behind a lock, stepped by one daemon thread; outputs go to per-request queues."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hydrabrain-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue[RequestOutput]]:
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = f"req-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.engine.add_request(prompt_ids, params, request_id=rid)
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        return rid, queue

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)
        self.engine.cancel(request_id)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.engine.has_work
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
                    targets = [(self._queues.get(o.request_id), o) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._queues.pop(o.request_id, None)
            except BaseException as exc:  # noqa: BLE001 - a broken step must fail the waiting requests, not hang them
                self.error = exc
                with self._lock:
                    waiting = list(self._queues.values())
                    self._queues.clear()
                for loop, queue in waiting:
                    loop.call_soon_threadsafe(queue.put_nowait, exc)  # type: ignore[arg-type]
                return
            for target, o in targets:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, o)


# --- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    kv_budget: int | None = Field(None, ge=1)
    kv_policy: str | None = None
    kv_document_tokens: int | None = Field(None, ge=1)
    kv_spill: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class BackendState:
    worker: AsyncEngine
    tokenizer: Any
    model_id: str
    default_max_tokens: int
    default_kv_budget: int | None
    default_kv_policy: str | None
    created: int
    default_kv_spill: bool = False


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _check_model(state: BackendState, body: _Body) -> None:
    if body.model != state.model_id:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{state.model_id}`", param="model", code="model_not_found")


def _params(state: BackendState, body: _Body, max_tokens: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
    budget = body.kv_budget if body.kv_budget is not None else state.default_kv_budget
    policy = body.kv_policy if body.kv_policy is not None else state.default_kv_policy
    # The server's default spills only where it can act (a budget, a query-aware policy, a runner
    # that can re-read); a request that asks for it explicitly gets an error where it cannot.
    spill = body.kv_spill if body.kv_spill is not None else (
        state.default_kv_spill and budget is not None and getattr(state.worker.engine.runner, "reread_supported", False)
        and _query_aware(policy or state.worker.engine.kv_policy))
    return SamplingParams(max_tokens=max_tokens or state.default_max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=stop, kv_budget=budget, kv_policy=policy, kv_document_tokens=body.kv_document_tokens, kv_spill=spill)


def _query_aware(spec: str) -> bool:
    """Whether a policy name is one kv_spill works with (an unknown name is left for the engine to refuse)."""
    try:
        return parse_policy(spec).name in ("snapkv", "heads", "auto")
    except UnknownPolicy:
        return False


def _message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _submit(state: BackendState, prompt_ids: list[int], params: SamplingParams, param: str) -> tuple[str, asyncio.Queue[RequestOutput]]:
    if state.worker.error is not None:
        raise APIError(500, f"the engine stopped after an internal error: {state.worker.error}", type_="server_error")
    try:
        return state.worker.submit(prompt_ids, params)
    except RequestRejected as exc:
        raise APIError(400, str(exc), param=exc.param or (param if exc.code == "context_length_exceeded" else None), code=exc.code) from None


async def _next(queue: asyncio.Queue[RequestOutput], request: Request) -> RequestOutput | None:
    """The request's next output, or None once the client has gone."""
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if isinstance(item, BaseException):
            raise APIError(500, f"the engine failed: {item}", type_="server_error")
        return item


def _usage(state: BackendState, out: RequestOutput) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                             "total_tokens": out.prompt_tokens + out.completion_tokens}
    st = out.stats
    if st is not None and st.policy is not None:
        per_block = state.worker.engine.cache.bytes_per_block
        usage["kv"] = {"policy": st.policy, "bytes_peak": st.peak_blocks * per_block, "bytes_steady": st.steady_blocks * per_block,
                       "blocks_freed": st.blocks_freed, "compactions": st.compactions, "bytes_host": st.host_bytes}
    return usage


# --- endpoints ----------------------------------------------------------------------------------


def _model_card(state: BackendState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "hydrabrain"}


async def list_models(request: Request) -> Response:
    state: BackendState = request.app.state.backend
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state: BackendState = request.app.state.backend
    if request.path_params["model"] != state.model_id:
        raise APIError(404, f"The model `{request.path_params['model']}` does not exist", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def _run(request: Request, kind: Literal["text", "chat"], prompt_ids: list[int], params: SamplingParams, body: _Body, param: str) -> Response:
    state: BackendState = request.app.state.backend
    rid, queue = _submit(state, prompt_ids, params, param)
    created = int(time.time())
    obj_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + rid.removeprefix("req-")

    if not body.stream:
        text, last = [], None
        try:
            while last is None or not last.finished:
                out = await _next(queue, request)
                if out is None:
                    state.worker.cancel(rid)
                    return Response(status_code=499)
                text.append(out.new_text)
                last = out
        except BaseException:
            state.worker.cancel(rid)
            raise
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return JSONResponse(
            {"id": obj_id, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
             "model": state.model_id, "choices": [choice], "usage": _usage(state, last)}
        )

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        payload = {"id": obj_id, "object": obj, "created": created, "model": state.model_id, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if kind == "chat":
                yield chunk(None, None, first=True)
            while not finished:
                out = await _next(queue, request)
                if out is None:
                    return
                finished = out.finished
                if out.new_text or out.finished:
                    yield chunk(out.new_text, out.finish_reason if out.finished else None)
            if include_usage:
                usage = {"id": obj_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
                         "model": state.model_id, "choices": [], "usage": _usage(state, out)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type, 'param': exc.param, 'code': exc.code}})}\n\n"
        finally:
            if not finished:
                state.worker.cancel(rid)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completions(request: Request) -> Response:
    state: BackendState = request.app.state.backend
    body: CompletionBody = await _parse(request, CompletionBody)
    _check_model(state, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "this server completes one prompt per request; send a string", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # Off the event loop: a long prompt takes seconds to tokenise, and other requests must not wait.
        prompt_ids = await asyncio.to_thread(state.tokenizer.encode, prompt, add_special_tokens=False)
    else:
        vocab = len(state.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        prompt_ids = list(prompt)
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return await _run(request, "text", prompt_ids, _params(state, body, body.max_tokens or 16), body, "prompt")


async def chat_completions(request: Request) -> Response:
    state: BackendState = request.app.state.backend
    body: ChatBody = await _parse(request, ChatBody)
    _check_model(state, body)
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise APIError(400, f"the model `{state.model_id}` has no chat template; use /v1/completions", param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)} for m in body.messages]
    text = await asyncio.to_thread(state.tokenizer.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _run(request, "chat", prompt_ids, _params(state, body, max_tokens), body, "messages")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_=type_).response()


def build_app(engine: Engine, tokenizer: Any, model_id: str, *, default_max_tokens: int = 256, default_kv_budget: int | None = None,
              default_kv_policy: str | None = None, default_kv_spill: bool = False, token_verifier: Any = None, required_scope: str = "router:complete",
              max_body_bytes: int = 4_000_000, allowed_hosts: list[str] | None = None, body_timeout_s: float = 30.0) -> _Guard:
    """The Starlette app serving ``engine`` as ``model_id``; the engine thread runs while the app does.

    With a `token_verifier` (anything with ``async verify_token(token) -> AccessToken | None``, the
    suite's `[auth]` verifiers), every /v1 request needs ``Authorization: Bearer`` with
    `required_scope` (OpenAI clients send their API key that way). Bodies over `max_body_bytes` get
    413 before anything is parsed or tokenised, and a body slower than `body_timeout_s` gets 408. With `allowed_hosts` (``host:port``, ``host:*``), a
    request naming another Host gets 421: bound to loopback, that is what stops DNS rebinding.
    """
    worker = AsyncEngine(engine)
    state = BackendState(worker, tokenizer, model_id, default_max_tokens, default_kv_budget, default_kv_policy, int(time.time()), default_kv_spill)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.backend = state
    return _Guard(app, token_verifier, required_scope, max_body_bytes, allowed_hosts, body_timeout_s)


def _replaying(body: bytes, upstream: Any) -> Any:
    """A `receive` that hands over the already-read body once, then the client's own messages (disconnects)."""
    delivered = False

    async def replay() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return replay


class _Guard:
    """ASGI: the bearer check and the body limit, in OpenAI's error shape, before any route runs."""

    def __init__(self, app: Starlette, verifier: Any, scope: str, max_body: int, allowed_hosts: list[str] | None = None,
                 body_timeout_s: float = 30.0) -> None:
        self.app, self.verifier, self.scope, self.max_body, self.body_timeout_s = app, verifier, scope, max_body, body_timeout_s
        self.allowed_hosts = allowed_hosts or []
        self.state = app.state  # tests and the CLI reach the backend state through the app

    def _host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return any(host == pattern or (pattern.endswith(":*") and name == pattern[:-2]) for pattern in self.allowed_hosts)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self._host_allowed(headers.get("host", "")):
            await self._error(send, 421, f"this server does not answer for Host {headers.get('host', '')!r}", "invalid_host")
            return
        if self.verifier is not None:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            access = await self.verifier.verify_token(token) if token else None
            if access is None or (access.expires_at and access.expires_at < time.time()):
                await self._error(send, 401, "a valid API key is needed: send `Authorization: Bearer <token>` ([auth] in hydrabrain.toml says which tokens)",
                                  "invalid_api_key", b'Bearer realm="hydrabrain-backend"')
                return
            if self.scope not in access.scopes and "admin" not in access.scopes:
                await self._error(send, 403, f"this token lacks the '{self.scope}' scope the backend needs", "insufficient_scope",
                                  f'Bearer error="insufficient_scope", scope="{self.scope}"'.encode())
                return
        if scope.get("method") == "POST":
            body = await self._read_body(receive, send)
            if body is None:
                return
            receive = _replaying(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Any, send: Any) -> bytes | None:
        """The whole body, or None once a 413/408 has been sent (too big, or too slow to arrive)."""
        chunks: list[bytes] = []
        size, more = 0, True
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None  # the client left before sending its request
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body:
                        await self._error(send, 413, f"the request body is over {self.max_body} bytes", "request_too_large")
                        return None
                    more = message.get("more_body", False)
        except TimeoutError:
            await self._error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s", "request_timeout", close=True)
            return None
        return b"".join(chunks)

    async def _error(self, send: Any, status: int, message: str, code: str, challenge: bytes | None = None, close: bool = False) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if challenge:
            headers.append((b"www-authenticate", challenge))
        if close:  # the rest of the body never came: the connection cannot carry another request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_engine(model: str, *, num_blocks: int = 2048, max_batch: int = 8, prefill_chunk: int = 256, compaction_interval: int = 128,
                  kv_policy: str = "auto", heads_file: str | Path | None = None, rank_if_missing: bool = False,
                  calibration_text: str | None = None, whole_heads: int = 3, spill_format: str = "float16",
                  snapkv_chunk: int | None = None, spill_recall: int | None = None) -> tuple[Engine, Any]:
    """Load ``model`` (name or path), calibrate its query statistics and build an engine.

    ``heads_file`` caches the model's head ranking (causal patching) for the ``heads`` policy: read
    when it exists, else computed and written when ``rank_if_missing`` (minutes on a CPU).
    ``calibration_text`` replaces the built-in paragraph for the triattention statistics.
    ``whole_heads`` is how many of the ranked KV heads the ``heads`` policy keeps whole.
    ``spill_format`` is how the host tier of ``kv_spill`` requests stores K/V (float16 or int8).
    ``spill_recall``: a question after a spilled document is read over this many times the budget,
    recalled from the host tier, before the cache is cut to the budget (1: read over the budget;
    None: the engine's default).
    ``snapkv_chunk``: snapkv and heads choose whole chunks of this many tokens (0: single tokens;
    None: the engine's default).
    """
    import torch

    from hydrabrain.inference import model as hydrahead  # registers the HydraHead Auto classes
    from hydrabrain.inference import models
    from hydrabrain.inference.hydra import PagedHydraHead
    from hydrabrain.inference.llama import PagedLlama
    from hydrabrain.inference.policies import load_head_ranking, rank_heads
    from hydrabrain.inference.scoring import CALIBRATION_TEXT, calibrate

    hf_model, tokenizer = models.load(model)
    runner = PagedHydraHead(hf_model) if isinstance(hf_model, hydrahead.HydraHeadForCausalLM) else PagedLlama(hf_model)
    ids = torch.tensor(tokenizer.encode(calibration_text or CALIBRATION_TEXT, add_special_tokens=False)[: runner.max_position])
    stats = calibrate(runner, ids)
    eos = [t for t in {tokenizer.eos_token_id, getattr(runner.config, "eos_token_id", None)} if isinstance(t, int)]
    ranking = None
    if heads_file is not None and getattr(runner, "whole_heads_supported", False):
        if Path(heads_file).is_file():
            ranking = load_head_ranking(heads_file)
        elif rank_if_missing:
            ranking = rank_heads(hf_model, tokenizer, heads_file)
    engine = Engine(runner, tokenizer, num_blocks=num_blocks, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    compaction_interval=compaction_interval, stats=stats, eos_token_ids=eos, kv_policy=kv_policy, head_ranking=ranking,
                    whole_heads=whole_heads, spill_format=spill_format,
                    **{name: value for name, value in (("snapkv_chunk", snapkv_chunk), ("spill_recall", spill_recall)) if value is not None})
    return engine, tokenizer


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8808, log_level: str = "warning") -> None:
    import uvicorn

    with contextlib.suppress(KeyboardInterrupt):
        # SIGTERM: stop taking requests, give open ones a few seconds, then go (streams are cut, not awaited).
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
