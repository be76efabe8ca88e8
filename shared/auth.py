"""Who is calling a server over HTTP, proved by a bearer token, and what that caller may do.

Over stdio one person runs one server for themselves and is trusted. Over HTTP each server is an
OAuth 2.1 resource server, as the MCP authorization spec asks: `[auth] mode` chooses how a bearer
token is verified, and the SDK's bearer middleware answers a missing or bad token with 401 and the
protected-resource metadata URL. This module adds what the SDK leaves to each server:

- opaque API tokens for a team on one machine, kept only as hashes in the data home (`TokenStore`);
- JWT access tokens from an identity provider, checked against its JWKS (`JWTVerifier`);
- one scope per tool, declared beside the tool (`ToolScopes`), refused with 403 naming the scope
  before the call reaches the server (`ScopeGate`) and again inside it (`ScopeCheck`), so a call
  the router forwards in process obeys the same rule as a direct one;
- the caller for the tools (`current_caller`, `user_for`): a memory belongs to the token's user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jwt
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Receive, Scope, Send

from hydrabrain.shared.config import AuthConfig, ConfigError, Settings
from hydrabrain.shared.telemetry import get_logger

log = get_logger("auth")

ADMIN = "admin"
SCOPES: dict[str, str] = {
    "wiki:read": "search and ask the wiki, read its pages, lint",
    "wiki:write": "ingest sources, compile and edit pages",
    "memory:read": "recall, brief and read the caller's own memories",
    "memory:write": "sessions, remember, consolidate and forget the caller's own memories",
    "crag:read": "retrieve with correction",
    "loop:run": "discover, hand off, verify and schedule work in allowed repositories",
    "router:complete": "model completions, routing and the cost ledger",
    ADMIN: "every scope, and acting for any user",
}
# The key under a request's `_meta` by which the router tells a server it mounts in process who is
# calling. Only honoured where no bearer token was presented: over HTTP the token always wins.
CALLER_META_KEY = "hydrabrain/caller"
FORBIDDEN = -32003  # JSON-RPC server error: the caller lacks the scope a request needs


class PermissionDenied(Exception):
    """The caller may not do this; the message names the scope or the rule."""


@dataclass(frozen=True)
class Caller:
    user: str
    scopes: frozenset[str]
    client_id: str = ""

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    def as_meta(self) -> dict[str, Any]:
        return {"user": self.user, "scopes": sorted(self.scopes), "client_id": self.client_id}

    @classmethod
    def from_meta(cls, raw: Any) -> Caller | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("user"), str) or not raw["user"]:
            return None
        scopes = raw.get("scopes")
        return cls(user=raw["user"], scopes=frozenset(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else frozenset(),
                   client_id=str(raw.get("client_id") or ""))

    @classmethod
    def from_token(cls, token: AccessToken) -> Caller:
        return cls(user=token.subject or token.client_id, scopes=frozenset(token.scopes), client_id=token.client_id)


_caller: ContextVar[Caller | None] = ContextVar("hydrabrain_caller", default=None)


def current_caller() -> Caller | None:
    """The proven caller of the request being served; None where nobody is (stdio, loopback without auth)."""
    caller = _caller.get()
    if caller is not None:
        return caller
    token = get_access_token()
    return Caller.from_token(token) if token is not None else None


@contextlib.contextmanager
def acting_as(caller: Caller | None) -> Iterator[None]:
    """Serve the code inside as `caller` (what `ScopeCheck` does for each request)."""
    reset = _caller.set(caller)
    try:
        yield
    finally:
        _caller.reset(reset)


def user_for(requested: str | None) -> str:
    """The user a call acts for: the token's own; another user's only with the admin scope.

    Without a proven caller (stdio, or loopback without auth) the named user is taken as given,
    since whoever runs the server already owns all of its data.
    """
    caller = current_caller()
    if caller is None:
        if not requested:
            raise PermissionDenied("name the user: without an authenticated caller there is nobody to default to")
        return requested
    if not requested or requested == caller.user:
        return caller.user
    if caller.allows(ADMIN):
        return requested
    raise PermissionDenied(f"this token acts for {caller.user!r}; acting for {requested!r} needs the '{ADMIN}' scope")


# --- API tokens ---------------------------------------------------------------------------------

TOKEN_PREFIX = "hbt_"


@dataclass
class TokenRecord:
    id: str
    user: str
    scopes: list[str]
    created_at: float
    sha256: str = field(repr=False)
    note: str = ""
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


def parse_scopes(raw: str | list[str]) -> list[str]:
    """Scopes from `a,b c` or a list; an unknown scope is an error that lists the known ones."""
    items = raw if isinstance(raw, list) else raw.replace(",", " ").split()
    scopes = sorted({s.strip() for s in items if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"give at least one scope; known: {', '.join(SCOPES)}")
    return scopes


class TokenStore:
    """API tokens for `[auth] mode = "tokens"`: shown once when created, stored only as SHA-256 hashes.

    A token is 256 random bits, so a plain hash cannot be brute-forced and lookups stay cheap. The
    file is re-read when it changes, so `revoke` takes effect on running servers at their next request.
    """

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "auth" / "tokens.json"
        self._cache: tuple[tuple[int, int], dict[str, TokenRecord]] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self._read()
            yield records
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps([asdict(r) for r in records.values()], indent=1))
            os.chmod(tmp, 0o600)
            tmp.replace(self.path)

    def _read(self) -> dict[str, TokenRecord]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        key = (stat.st_mtime_ns, stat.st_size)
        if self._cache is None or self._cache[0] != key:
            try:
                rows = json.loads(self.path.read_text())
                records = {r["id"]: TokenRecord(**r) for r in rows}
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"{self.path} is not a token file this version can read ({exc}); restore it or remove it and issue new tokens") from None
            self._cache = (key, records)
        return dict(self._cache[1])

    def create(self, user: str, scopes: str | list[str], note: str = "") -> tuple[str, TokenRecord]:
        if not user.strip():
            raise ValueError("a token needs a user (--user NAME)")
        wanted = parse_scopes(scopes)
        token_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(id=token_id, user=user.strip(), scopes=wanted, created_at=time.time(),
                             sha256=hashlib.sha256(token.encode()).hexdigest(), note=note)
        with self._locked() as records:
            records[token_id] = record
        return token, record

    def list(self) -> list[TokenRecord]:
        return sorted(self._read().values(), key=lambda r: r.created_at)

    def revoke(self, token_id: str) -> TokenRecord:
        with self._locked() as records:
            record = records.get(token_id)
            if record is None:
                raise KeyError(f"no token with id {token_id!r}; `hydrabrain auth token list` shows them")
            if record.revoked_at is None:
                record.revoked_at = time.time()
        return record

    def lookup(self, token: str) -> TokenRecord | None:
        """The live record a presented token belongs to, or None."""
        if not token.startswith(TOKEN_PREFIX) or token.count("_") < 2:
            return None
        token_id = token[len(TOKEN_PREFIX):].split("_", 1)[0]
        record = self._read().get(token_id)
        if record is None or record.revoked_at is not None:
            return None
        if not hmac.compare_digest(record.sha256, hashlib.sha256(token.encode()).hexdigest()):
            return None
        return record


class StoreTokenVerifier:
    """The SDK's `TokenVerifier` over a `TokenStore`."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def verify_token(self, token: str) -> AccessToken | None:
        record = self.store.lookup(token)
        if record is None:
            return None
        return AccessToken(token=token, client_id=f"token:{record.id}", scopes=list(record.scopes), subject=record.user)


# --- JWT from an identity provider --------------------------------------------------------------


class JWTVerifier:
    """The SDK's `TokenVerifier` for JWT access tokens signed by an identity provider.

    Checks signature (key by `kid` from the provider's JWKS, cached, refetched once on an unknown
    `kid` so key rotation needs no restart), issuer, audience (this server's resource URL unless
    configured), expiry, and that the token names a user. Scopes come from `scope` (space separated)
    or `scp` (a list), the two spellings providers use.
    """

    def __init__(self, config: AuthConfig, audience: str) -> None:
        if not config.issuer or not config.jwks_url:
            raise ConfigError('[auth] mode = "jwt" needs issuer and jwks_url (the identity provider\'s issuer and its JWKS URL)')
        self.config = config
        self.audience = config.audience or audience
        self.jwks = jwt.PyJWKClient(config.jwks_url, cache_keys=True, lifespan=config.jwks_cache_s, timeout=10,
                                    cooldown_duration=config.jwks_refetch_cooldown_s)
        # A verified token stays valid until it expires (JWTs cannot be revoked early), so an agent's
        # repeated calls pay for the signature check once; the bearer middleware still checks `exp`.
        self._verified: OrderedDict[str, AccessToken] = OrderedDict()
        self._lock = threading.Lock()

    async def verify_token(self, token: str) -> AccessToken | None:
        with self._lock:
            known = self._verified.get(token)
            if known is not None and (known.expires_at or 0) > time.time():
                self._verified.move_to_end(token)
                return known
        access = await anyio.to_thread.run_sync(self._verify, token)  # may fetch the JWKS: off the event loop
        if access is not None:
            with self._lock:
                self._verified[token] = access
                while len(self._verified) > VERIFIED_CACHE:
                    self._verified.popitem(last=False)
        return access

    def _verify(self, token: str) -> AccessToken | None:
        cfg = self.config
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=cfg.algorithms, audience=self.audience, issuer=cfg.issuer,
                                leeway=cfg.leeway_s, options={"require": ["exp", "iss", "aud", cfg.user_claim]})
        except (jwt.PyJWTError, ValueError) as exc:
            log.info("bearer token refused: %s", exc)
            return None
        raw_scopes = claims.get("scope", claims.get("scp", []))
        scopes = raw_scopes.split() if isinstance(raw_scopes, str) else [str(s) for s in raw_scopes] if isinstance(raw_scopes, list) else []
        user = str(claims[cfg.user_claim])
        return AccessToken(token=token, client_id=str(claims.get("client_id") or claims.get("azp") or user), scopes=scopes,
                           expires_at=int(claims["exp"]), resource=self.audience, subject=user, claims={"iss": claims["iss"]})


VERIFIED_CACHE = 4096  # distinct live tokens remembered per server


def resource_url(config: AuthConfig, path: str = "/mcp") -> str:
    """This server's resource identifier: where clients reach its MCP endpoint."""
    return (config.public_url or "http://127.0.0.1:8000").rstrip("/") + path


def token_verifier(settings: Settings, path: str = "/mcp") -> Any:
    """The verifier `[auth] mode` asks for, or None for mode none."""
    cfg = settings.auth
    if cfg.mode == "tokens":
        return StoreTokenVerifier(TokenStore(settings.home))
    if cfg.mode == "jwt":
        return JWTVerifier(cfg, resource_url(cfg, path))
    return None


def authorization_server(config: AuthConfig) -> str:
    """Who issues tokens: the identity provider (jwt), or the server itself (tokens issued by the CLI)."""
    return config.issuer if config.mode == "jwt" and config.issuer else (config.public_url or "http://127.0.0.1:8000")


LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def check_bind(host: str, config: AuthConfig, *, insecure_no_auth: bool = False, what: str = "the server") -> None:
    """Refuse to serve a non-loopback address with nobody checked at the door, unless told to."""
    if config.mode != "none" or is_loopback(host):
        return
    if insecure_no_auth:
        log.warning("%s listens on %s with NO authentication (--insecure-no-auth): anyone who reaches the port can call "
                    "every tool and act for any user", what, host)
        return
    raise ConfigError(
        f"refusing to serve {what} on {host} without authentication: anyone who reaches it could call every tool and "
        f'read any user\'s memory. Set [auth] mode = "tokens" (then `hydrabrain auth token create --user NAME --scopes ...`) '
        f'or mode = "jwt" with issuer and jwks_url in hydrabrain.toml, bind 127.0.0.1, or pass --insecure-no-auth to accept the risk'
    )


# --- scopes per tool ----------------------------------------------------------------------------


class ToolScopes:
    """Which scope each tool of one server needs, declared beside the tool:

        @server.tool()
        @scopes.need("memory:read")
        async def recall(...): ...

    Resources of the server need `resources` (reading them is a read).
    """

    def __init__(self, server: str, resources: str | None = None) -> None:
        self.server = server
        self.tools: dict[str, str] = {}
        self.resources = resources

    def need(self, scope: str) -> Callable[[Any], Any]:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")

        def mark(fn: Any) -> Any:
            self.tools[fn.__name__] = scope
            return fn

        return mark

    def needed(self, method: str, params: dict[str, Any] | None) -> tuple[str, str] | None:
        """(scope, what) a request needs, or None when this server declares nothing for it."""
        params = params or {}
        if method == "tools/call":
            name = str(params.get("name", ""))
            scope = self.tools.get(name)
            return (scope, f"the {self.server} tool '{name}'") if scope else None
        if method == "resources/read" and self.resources:
            return self.resources, f"the {self.server} resource {params.get('uri', '')}"
        return None

    def all(self) -> list[str]:
        return sorted(set(self.tools.values()) | ({self.resources} if self.resources else set()))


def _insufficient(scope: str, what: str, caller: Caller) -> str:
    has = ", ".join(sorted(caller.scopes)) or "none"
    return f"{what} needs the '{scope}' scope; this token ({caller.user}) has: {has}"


class ScopeCheck:
    """Server middleware: serve each request as its caller, and refuse what the caller's scopes do not allow.

    The caller is the bearer token's; without one (the router's in-process mounts), the caller the
    router put in `_meta`; without either, nobody (stdio and loopback without auth are trusted).
    """

    def __init__(self, scopes: ToolScopes) -> None:
        self.scopes = scopes

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        token = get_access_token()
        params = ctx.params if isinstance(ctx.params, dict) else {}
        if token is not None:
            caller: Caller | None = Caller.from_token(token)
        else:
            meta = params.get("_meta")
            caller = Caller.from_meta(meta.get(CALLER_META_KEY)) if isinstance(meta, dict) else None
        with acting_as(caller):
            if caller is not None:
                need = self.scopes.needed(ctx.method, params)
                if need and not caller.allows(need[0]):
                    raise MCPError(FORBIDDEN, _insufficient(need[0], need[1], caller))
            return await call_next(ctx)


# Where `serving.RequestLimits` leaves the request body it has read, so later layers need not read it again.
REQUEST_BODY = "hydrabrain.request_body"


class ScopeGate:
    """ASGI middleware inside the bearer middleware: 403 with `insufficient_scope` for a request whose
    token lacks the scope, before the server sees it (what the MCP spec asks of a resource server).

    It reads the body `serving.RequestLimits` buffered; without one it lets the request through, and
    `ScopeCheck` inside the server still refuses it (as a JSON-RPC error rather than a 403).
    """

    def __init__(self, app: ASGIApp, scopes: ToolScopes, metadata_url: str) -> None:
        self.app, self.scopes, self.metadata_url = app, scopes, metadata_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = scope.get("user")
        body = scope.get(REQUEST_BODY)
        if scope["type"] == "http" and isinstance(user, AuthenticatedUser) and isinstance(body, bytes):
            refusal = self._refusal(Caller.from_token(user.access_token), body)
            if refusal is not None:
                need, description = refusal
                header = f'Bearer error="insufficient_scope", scope="{need}", resource_metadata="{self.metadata_url}"'
                await send_json(send, 403, {"error": "insufficient_scope", "error_description": description},
                                [(b"www-authenticate", header.encode())])
                return
        await self.app(scope, receive, send)

    def _refusal(self, caller: Caller, body: bytes) -> tuple[str, str] | None:
        """(scope, message) for the first JSON-RPC message the caller may not send, or None."""
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # not JSON: the transport answers that
        for msg in payload if isinstance(payload, list) else [payload]:
            if not isinstance(msg, dict):
                continue
            need = self.scopes.needed(str(msg.get("method", "")), msg.get("params") if isinstance(msg.get("params"), dict) else None)
            if need and not caller.allows(need[0]):
                return need[0], _insufficient(need[0], need[1], caller)
        return None


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole JSON response sent straight from ASGI middleware."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
