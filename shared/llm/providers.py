"""Wire formats: OpenAI-compatible chat completions and the Anthropic Messages API, over httpx.

A provider call either returns a `RawAnswer` or raises `ProviderError`, whose `kind` tells the
router whether another try can help (rate limits, 5xx, timeouts) or not (bad key, bad request,
a body that is not the API's JSON).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from hydrabrain.shared.config import ProviderConfig

ErrorKind = Literal["rate_limited", "server", "timeout", "connection", "malformed", "client", "auth"]
RETRYABLE: frozenset[str] = frozenset({"rate_limited", "server", "timeout", "connection"})
ANTHROPIC_VERSION = "2023-06-01"


class ProviderError(Exception):
    """One failed request to one deployment."""

    def __init__(self, kind: ErrorKind, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def short(self) -> str:
        code = f"HTTP {self.status} " if self.status else ""
        return f"{code}{self.kind}: {self}"


@dataclass
class RawAnswer:
    text: str
    input_tokens: int | None
    output_tokens: int | None
    finish_reason: str | None = None


@dataclass
class StreamDelta:
    """A piece of streamed text; the last one of a stream carries `final`."""

    text: str
    final: RawAnswer | None = None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_for_status(response: httpx.Response, secret: str | None = None) -> ProviderError:
    status = response.status_code
    try:
        detail = response.text[:300]
    except Exception:  # noqa: BLE001 - a body we cannot decode says nothing more
        detail = ""
    if secret:
        detail = detail.replace(secret, "***")  # some APIs echo the key back; it must not reach logs or the ledger
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return ProviderError("rate_limited", f"rate limited {detail}".strip(), status, retry_after)
    if status in (401, 403):
        return ProviderError("auth", f"the provider refused the API key {detail}".strip(), status)
    if status >= 500 or status == 408:
        return ProviderError("server", f"server error {detail}".strip(), status, retry_after)
    return ProviderError("client", f"request rejected {detail}".strip(), status)


@dataclass
class Provider:
    """One configured endpoint; holds an httpx client per event loop so connections are reused."""

    config: ProviderConfig
    _clients: dict[int, httpx.AsyncClient] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def api_key(self) -> str | None:
        env = self.config.api_key_env
        return os.environ.get(env) if env else None

    def client(self) -> httpx.AsyncClient:
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None or client.is_closed:
            # Stale clients from finished loops (sync callers) cannot be closed from here; drop them.
            self._clients = {k: c for k, c in self._clients.items() if not c.is_closed and k == loop_id}
            client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), trust_env=False)
            self._clients[loop_id] = client
        return client

    async def aclose(self) -> None:
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.pop(loop_id, None)
        if client is not None:
            await client.aclose()

    # --- request shapes -------------------------------------------------------------------------

    def _request(self, model: str, messages: list[dict[str, Any]], max_tokens: int | None, stream: bool) -> tuple[str, dict[str, str], dict[str, Any]]:
        key = self.api_key()
        base = self.config.base_url.rstrip("/")
        if self.config.kind == "anthropic":
            url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
            headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
            if key:
                headers["x-api-key"] = key
            system = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "system")
            body: dict[str, Any] = {
                "model": model,
                "max_tokens": max_tokens or 1024,  # required by the Messages API
                "messages": [m for m in messages if m.get("role") != "system"],
            }
            if system:
                body["system"] = system
        else:
            url = base + "/chat/completions"
            headers = {"content-type": "application/json"}
            if key:
                headers["authorization"] = f"Bearer {key}"
            body = {"model": model, "messages": messages}
            if max_tokens:
                body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            if self.config.kind == "openai":
                body["stream_options"] = {"include_usage": True}
        return url, headers, body

    # --- one request ----------------------------------------------------------------------------

    async def complete(self, model: str, messages: list[dict[str, Any]], max_tokens: int | None) -> RawAnswer:
        url, headers, body = self._request(model, messages, max_tokens, stream=False)
        try:
            response = await self.client().post(url, headers=headers, json=body)
        except httpx.TimeoutException:
            raise ProviderError("timeout", f"no answer within {self.config.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ProviderError("connection", f"cannot reach {self.config.base_url}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise _error_for_status(response, self.api_key())
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProviderError("malformed", f"the answer is not JSON: {response.text[:120]!r}", 200) from None
        try:
            return self._parse(data)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ProviderError("malformed", f"the answer lacks {exc} where the {self.config.kind} API puts it", 200) from None

    def _parse(self, data: dict[str, Any]) -> RawAnswer:
        if self.config.kind == "anthropic":
            text = "".join(block.get("text", "") for block in data["content"] if block.get("type") == "text")
            usage = data.get("usage") or {}
            return RawAnswer(text, usage.get("input_tokens"), usage.get("output_tokens"), data.get("stop_reason"))
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        usage = data.get("usage") or {}
        return RawAnswer(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), choice.get("finish_reason"))

    async def stream(self, model: str, messages: list[dict[str, Any]], max_tokens: int | None) -> AsyncIterator[StreamDelta]:
        """Server-sent events from either API, as text deltas; the last delta carries the totals."""
        url, headers, body = self._request(model, messages, max_tokens, stream=True)
        parts: list[str] = []
        input_tokens: int | None = None
        output_tokens: int | None = None
        finish: str | None = None
        try:
            async with self.client().stream("POST", url, headers=headers, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error_for_status(response, self.api_key())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        event = json.loads(payload)
                    except json.JSONDecodeError:
                        raise ProviderError("malformed", f"a streamed event is not JSON: {payload[:80]!r}", 200) from None
                    text = ""
                    if self.config.kind == "anthropic":
                        kind = event.get("type")
                        if kind == "message_start":
                            input_tokens = (event.get("message", {}).get("usage") or {}).get("input_tokens")
                        elif kind == "content_block_delta":
                            text = (event.get("delta") or {}).get("text", "")
                        elif kind == "message_delta":
                            output_tokens = (event.get("usage") or {}).get("output_tokens", output_tokens)
                            finish = (event.get("delta") or {}).get("stop_reason", finish)
                        elif kind == "error":
                            raise ProviderError("server", f"stream error: {event.get('error')}", 200)
                    else:
                        for choice in event.get("choices") or []:
                            text += (choice.get("delta") or {}).get("content") or ""
                            finish = choice.get("finish_reason") or finish
                        usage = event.get("usage") or {}
                        input_tokens = usage.get("prompt_tokens", input_tokens)
                        output_tokens = usage.get("completion_tokens", output_tokens)
                    if text:
                        parts.append(text)
                        yield StreamDelta(text)
        except httpx.TimeoutException:
            raise ProviderError("timeout", f"the stream stalled for {self.config.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ProviderError("connection", f"cannot reach {self.config.base_url}: {type(exc).__name__}") from None
        yield StreamDelta("", RawAnswer("".join(parts), input_tokens, output_tokens, finish))
