"""How every server of the suite is built and run, so each `server.py` holds only its own surface."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

from mcp.server import MCPServer

from hydrabrain.shared.config import Settings
from hydrabrain.shared.telemetry import ToolCallTracing, configure_logging, configure_tracing

SERVER_NAMES = ("wiki", "memory", "crag", "router", "loop")
Transport = Literal["stdio", "sse", "http"]


def new_server(
    name: str,
    *,
    instructions: str,
    lifespan: Callable[[MCPServer[Any]], AbstractAsyncContextManager[Any]],
    settings: Settings,
) -> MCPServer[Any]:
    """An MCPServer with the suite's logging and a traced span for every tool call."""
    configure_logging(settings.log_level)
    configure_tracing()
    return MCPServer(
        name=f"hydrabrain-{name}",
        instructions=instructions,
        version="0.1.0",
        lifespan=lifespan,
        log_level=settings.log_level,
        middleware=[ToolCallTracing(name)],
    )


def build(name: str, settings: Settings) -> MCPServer[Any]:
    """Import `hydrabrain.servers.<name>.server` and call its `build_server(settings)`."""
    if name not in SERVER_NAMES:
        raise ValueError(f"unknown server {name!r}; choose one of: {', '.join(SERVER_NAMES)}")
    try:
        module = importlib.import_module(f"hydrabrain.servers.{name}.server")
    except ModuleNotFoundError as exc:
        if exc.name == f"hydrabrain.servers.{name}.server":
            raise ValueError(f"the {name} server is not part of this installation") from None
        raise
    return module.build_server(settings)


def run(server: MCPServer[Any], transport: Transport, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve over stdio, SSE or streamable HTTP (mounted at /mcp)."""
    if transport == "stdio":
        server.run("stdio")
    elif transport == "sse":
        server.run("sse", host=host, port=port)
    else:
        server.run("streamable-http", host=host, port=port)
