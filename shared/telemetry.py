"""Structured logs on stderr and an OpenTelemetry span for every tool call.

stdout belongs to the stdio transport, so nothing here ever writes to it. Spans go to whatever
tracer provider the process has; `configure_tracing` installs the SDK's provider and, when
``HYDRABRAIN_TRACE_FILE`` is set, appends each finished span to that file as one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Status, StatusCode

TRACER_NAME = "hydrabrain"
_configured = False
_lock = threading.Lock()
_tracer: trace.Tracer | None = None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (test capture or a redirect)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        return None


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for everything under the `hydrabrain` logger."""
    root = logging.getLogger("hydrabrain")
    root.setLevel(level)
    if not any(getattr(h, "_hydrabrain", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter())
        handler._hydrabrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"hydrabrain.{name}")


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as fh:
            for span in spans:
                fh.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "trace_id": f"{span.context.trace_id:032x}",
                            "span_id": f"{span.context.span_id:016x}",
                            "start_ns": span.start_time,
                            "end_ns": span.end_time,
                            "status": span.status.status_code.name,
                            "attributes": dict(span.attributes or {}),
                        }
                    )
                    + "\n"
                )
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def configure_tracing() -> None:
    """Install the SDK tracer provider once per process (unless the host application already did)."""
    global _configured
    with _lock:
        if _configured:
            return
        _configured = True
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current
        else:
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        path = os.environ.get("HYDRABRAIN_TRACE_FILE")
        if path:
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))


def tracer() -> trace.Tracer:
    # A proxy tracer: it follows whichever provider is installed later, so one lookup serves for good.
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


class ToolCallTracing:
    """Server middleware: one span and one log line per `tools/call`, with tool, latency and outcome."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self.log = get_logger(f"{server_name}.tools")

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        params = ctx.params or {}
        tool = str(params.get("name", "?"))
        started = time.perf_counter()
        with tracer().start_as_current_span(f"{self.server_name}.{tool}") as span:
            span.set_attribute("mcp.server", self.server_name)
            span.set_attribute("mcp.tool", tool)
            from hydrabrain.shared.auth import current_caller  # late: auth imports this module

            caller = current_caller()
            if caller is not None:
                span.set_attribute("enduser.id", caller.user)
            outcome = "ok"
            try:
                result = await call_next(ctx)
            except BaseException as exc:
                outcome = "error"
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            else:
                is_error = getattr(result, "is_error", None)
                if is_error is None and isinstance(result, dict):
                    is_error = result.get("isError") or result.get("is_error")
                if is_error:
                    outcome = "tool_error"
                    span.set_status(Status(StatusCode.ERROR, "tool reported an error"))
                return result
            finally:
                latency_ms = (time.perf_counter() - started) * 1000
                span.set_attribute("mcp.outcome", outcome)
                span.set_attribute("mcp.latency_ms", latency_ms)
                log_event(self.log, "tool call", tool=tool, outcome=outcome, latency_ms=round(latency_ms, 2))
