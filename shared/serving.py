"""How every server of the suite is built and run, so each `server.py` holds only its own surface."""

from __future__ import annotations

import contextlib
import importlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.middleware import Middleware

from hydrabrain.shared import auth
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
    scopes: auth.ToolScopes | None = None,
) -> MCPServer[Any]:
    """An MCPServer with the suite's logging, a traced span for every tool call, and `[auth]` in force.

    `scopes` says which scope each tool needs; with `[auth] mode` other than none the server verifies
    bearer tokens over HTTP and refuses a call whose token lacks the tool's scope.
    """
    configure_logging(settings.log_level)
    configure_tracing()
    scopes = scopes or auth.ToolScopes(name)
    verifier = auth.token_verifier(settings)
    server = MCPServer(
        name=f"hydrabrain-{name}",
        instructions=instructions,
        version="0.1.0",
        lifespan=lifespan,
        log_level=settings.log_level,
        middleware=[auth.ScopeCheck(scopes), ToolCallTracing(name)],
        token_verifier=verifier,
        auth=_auth_settings(settings) if verifier is not None else None,
    )
    server.hydrabrain_scopes = scopes  # type: ignore[attr-defined]  # read by http_app and the docs check
    server.hydrabrain_settings = settings  # type: ignore[attr-defined]
    return server


def _auth_settings(settings: Settings) -> AuthSettings:
    # The verifiers check the audience themselves (JWT) or mint tokens for this server only (API
    # tokens), so the SDK's own resource check stays off.
    return AuthSettings(issuer_url=AnyHttpUrl(auth.authorization_server(settings.auth)),
                        resource_server_url=AnyHttpUrl(auth.resource_url(settings.auth)), validate_token_resource=False)


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


def http_app(server: MCPServer[Any], transport: Literal["sse", "http"] = "http", host: str = "127.0.0.1") -> Starlette:
    """The server's ASGI app: the SDK's transport and bearer middleware, plus the suite's scope gate,
    body limit, Host check and a protected-resource metadata document that lists the scopes."""
    settings: Settings = server.hydrabrain_settings  # type: ignore[attr-defined]
    scopes: auth.ToolScopes = server.hydrabrain_scopes  # type: ignore[attr-defined]
    server.hydrabrain_transport = transport  # type: ignore[attr-defined]  # tools that must be stricter over a network read it
    cfg = settings.auth
    security = None
    if cfg.allowed_hosts:
        security = TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=cfg.allowed_hosts,
                                             allowed_origins=[f"{scheme}://{h}" for h in cfg.allowed_hosts for scheme in ("http", "https")])
    if transport == "sse":
        app = server.sse_app(max_request_body_size=cfg.max_body_bytes, transport_security=security, host=host)
    else:
        app = server.streamable_http_app(max_request_body_size=cfg.max_body_bytes, transport_security=security, host=host)
    # Outermost: a body that is too big or too slow is answered before anything else reads it.
    app.user_middleware.insert(0, Middleware(RequestLimits, max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s))
    if server.settings.auth is not None:
        resource = AnyHttpUrl(auth.resource_url(cfg))
        metadata_url = str(build_resource_metadata_url(resource))
        # Appended last, so it runs inside the SDK's bearer middleware and sees the verified token.
        app.user_middleware.append(Middleware(auth.ScopeGate, scopes=scopes, metadata_url=metadata_url))
        # Ours first: the same document as the SDK's, naming the scopes this server's tools need.
        routes = create_protected_resource_routes(resource, [AnyHttpUrl(auth.authorization_server(cfg))],
                                                  scopes_supported=scopes.all(), resource_name=server.name)
        app.router.routes[0:0] = routes
    return app


class RequestLimits:
    """ASGI: read a POST body whole, within `max_body_bytes` (413) and `body_timeout_s` (408), then pass it on
    (and leave it in the scope under `auth.REQUEST_BODY` for the scope gate)."""

    def __init__(self, app: Any, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app, self.max_body, self.timeout_s = app, max_body_bytes, body_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        with anyio.move_on_after(self.timeout_s) as waited:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its request
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    await auth.send_json(send, 413, {"error": "request_too_large",
                                                     "error_description": f"the request body is over {self.max_body} bytes ([auth] max_body_bytes)"})
                    return
                more = message.get("more_body", False)
        if waited.cancelled_caught:
            await auth.send_json(send, 408, {"error": "request_timeout",
                                             "error_description": f"the request body did not arrive within {self.timeout_s:g} s ([auth] body_timeout_s)"},
                                 [(b"connection", b"close")])
            return
        body = b"".join(chunks)
        scope[auth.REQUEST_BODY] = body
        delivered = False

        async def replay() -> Any:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def run(server: MCPServer[Any], transport: Transport, host: str = "127.0.0.1", port: int = 8000, *, insecure_no_auth: bool = False) -> None:
    """Serve over stdio, SSE or streamable HTTP (mounted at /mcp); over a network only with `[auth]` or when told."""
    if transport == "stdio":
        server.run("stdio")
        return
    import uvicorn

    settings: Settings = server.hydrabrain_settings  # type: ignore[attr-defined]
    auth.check_bind(host, settings.auth, insecure_no_auth=insecure_no_auth, what=server.name)
    uvicorn.run(http_app(server, transport, host), host=host, port=port, log_level=settings.log_level.lower())


def public_url_for(settings: Settings, host: str, port: int) -> None:
    """Default `[auth] public_url` to the address being served, so metadata and audience match it."""
    if settings.auth.public_url is None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        settings.auth.public_url = f"http://{shown}:{port}"


@contextlib.contextmanager
def in_background(app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Serve an ASGI app under uvicorn in a daemon thread (tests, benchmarks, embedding); yields its base URL."""
    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, to name in settings before the server starts."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
