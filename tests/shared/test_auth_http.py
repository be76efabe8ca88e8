"""Over HTTP, who is calling is proved by a bearer token, each tool needs its scope, and a user's
memories are theirs alone: real servers on loopback, a real JWKS endpoint, the official client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import ProtectedResourceMetadata
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from hydrabrain.servers.cli import main
from hydrabrain.shared import serving
from hydrabrain.shared.auth import SCOPES, TokenStore
from hydrabrain.shared.config import Settings

pytestmark = pytest.mark.anyio


# --- a real identity provider's JWKS on loopback ------------------------------------------------


@dataclass
class IdentityProvider:
    url: str
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key, all published

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks.json"

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": out}

    def token(self, user: str, scopes: str, audience: str, *, expires_in: float = 300, issuer: str | None = None,
              kid: str = "k1", key: Any = None) -> str:
        now = int(time.time())
        claims = {"sub": user, "scope": scopes, "aud": audience, "iss": issuer or self.issuer, "iat": now, "exp": now + int(expires_in)}
        return jwt.encode(claims, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider(url="")
    provider.add_key("k1")
    jwks = Starlette(routes=[Route("/jwks.json", lambda request: JSONResponse(provider.jwks()))])
    with serving.in_background(jwks) as url:
        provider.url = url
        yield provider


# --- the suite's servers over streamable HTTP ----------------------------------------------------


@contextmanager
def served(settings: Settings, name: str) -> Iterator[str]:
    """`name` built from `settings` and served over streamable HTTP the way `hydrabrain serve` does; yields its base URL."""
    port = serving.free_port()
    settings.auth.public_url = f"http://127.0.0.1:{port}"
    with serving.in_background(serving.http_app(serving.build(name, settings)), port=port) as url:
        yield url


def jwt_settings(settings: Settings, idp: IdentityProvider) -> Settings:
    settings.auth.mode = "jwt"
    settings.auth.issuer = idp.issuer
    settings.auth.jwks_url = idp.jwks_url
    settings.auth.jwks_refetch_cooldown_s = 0
    settings.memory.extract_facts = False
    return settings


def as_user(url: str, token: str) -> Client:
    """The official client over streamable HTTP, presenting `token`."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return Client(streamable_http_client(f"{url}/mcp", http_client=http), cache=None)


def text(result: Any) -> str:
    return result.content[0].text if result.content else ""


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


# --- tests -----------------------------------------------------------------------------------------


async def test_a_users_jwt_reaches_their_own_memories_and_never_another_users(settings: Settings, idp: IdentityProvider) -> None:
    jwt_settings(settings, idp)
    with served(settings, "memory") as url:
        aud = f"{url}/mcp"
        alice = idp.token("alice", "memory:read memory:write", aud)
        bob = idp.token("bob", "memory:read memory:write", aud)
        admin = idp.token("ops", "admin", aud)
        async with as_user(url, alice) as client:
            started = await client.call_tool("start_session", {"task": "release"})
            assert not started.is_error, text(started)
            assert started.structured_content["user"] == "alice"  # the token's user, without naming one
            sid = started.structured_content["session_id"]
            kept = await client.call_tool("remember", {"session_id": sid, "text": "The staging database password rotates every Monday."})
            assert not kept.is_error, text(kept)
            mine = await client.call_tool("recall", {"query": "staging database password"})
            assert "Monday" in json.dumps(mine.structured_content)
            posing = await client.call_tool("start_session", {"user": "bob"})
            assert posing.is_error and "'admin' scope" in text(posing)
        async with as_user(url, bob) as client:
            nothing = await client.call_tool("recall", {"query": "staging database password"})
            assert not nothing.is_error and "Monday" not in json.dumps(nothing.structured_content)
            for tool, args in [("recall", {"query": "password", "user": "alice"}), ("briefing", {"task": "release", "user": "alice"}),
                               ("forget", {"user": "alice", "everything": True}), ("consolidate", {"user": "alice"}),
                               ("remember", {"session_id": sid, "text": "bob writes into alice's session"}), ("end_session", {"session_id": sid})]:
                refused = await client.call_tool(tool, args)
                assert refused.is_error and "alice" in text(refused), (tool, text(refused))
            for uri in ("memory://user/alice/facts", "memory://user/alice/lessons", f"memory://session/{sid}"):
                with pytest.raises(Exception, match="admin"):
                    await client.read_resource(uri)
        async with as_user(url, admin) as client:
            hers = await client.call_tool("recall", {"query": "staging database password", "user": "alice"})
            assert "Monday" in json.dumps(hers.structured_content)  # the admin scope may act for any user
        async with as_user(url, alice) as client:  # and bob's attempts changed nothing of hers
            still = await client.call_tool("recall", {"query": "staging database password"})
            assert "Monday" in json.dumps(still.structured_content)


async def test_a_missing_or_bad_token_gets_401_pointing_at_valid_protected_resource_metadata(settings: Settings, idp: IdentityProvider) -> None:
    jwt_settings(settings, idp)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with served(settings, "memory") as url:
        aud = f"{url}/mcp"
        bad = {
            "none": None,
            "garbage": "not-a-token",
            "expired": idp.token("alice", "memory:read", aud, expires_in=-120),
            "wrong audience": idp.token("alice", "memory:read", "http://127.0.0.1:1/mcp"),
            "wrong issuer": idp.token("alice", "memory:read", aud, issuer="http://evil.example"),
            "unknown key": idp.token("alice", "memory:read", aud, kid="k-forged", key=other),
            "wrong key for its kid": idp.token("alice", "memory:read", aud, key=other),
        }
        async with httpx2.AsyncClient(timeout=30) as http:
            for why, token in bad.items():
                headers = {**MCP_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
                response = await http.post(aud, json=INITIALIZE, headers=headers)
                assert response.status_code == 401, why
                challenge = response.headers["www-authenticate"]
                assert challenge.startswith("Bearer ") and f'resource_metadata="{url}/.well-known/oauth-protected-resource/mcp"' in challenge, why
            metadata = ProtectedResourceMetadata.model_validate((await http.get(f"{url}/.well-known/oauth-protected-resource/mcp")).json())
            assert str(metadata.resource).rstrip("/") == aud and [str(s).rstrip("/") for s in metadata.authorization_servers] == [idp.issuer]
            assert {"memory:read", "memory:write"} <= set(metadata.scopes_supported or [])

            # The provider rotates its key: a token under the new kid is accepted without a restart.
            idp.add_key("k2")
            rotated = idp.token("alice", "memory:read", aud, kid="k2")
            response = await http.post(aud, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {rotated}"})
            assert response.status_code == 200


async def test_a_token_without_the_scope_a_tool_needs_gets_403_naming_the_scope(settings: Settings, idp: IdentityProvider) -> None:
    jwt_settings(settings, idp)
    with served(settings, "memory") as url:
        aud = f"{url}/mcp"
        reader = idp.token("alice", "memory:read", aud)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "start_session", "arguments": {}}}
        async with httpx2.AsyncClient(timeout=30) as http:
            response = await http.post(aud, json=call, headers={**MCP_HEADERS, "Authorization": f"Bearer {reader}"})
        assert response.status_code == 403
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"] and 'scope="memory:write"' in response.headers["www-authenticate"]
        assert "memory:write" in response.json()["error_description"]
        async with as_user(url, reader) as client:  # reading is still allowed
            assert not (await client.call_tool("recall", {"query": "anything"})).is_error


async def test_api_tokens_created_by_the_cli_are_accepted_until_revoked(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth", "token", "create", "--user", "alice", "--scopes", "memory:read,memory:write", "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["token"].startswith("hbt_") and "sha256" not in issued
    stored = (settings.home / "auth" / "tokens.json").read_text()
    assert issued["token"] not in stored  # only its hash is kept
    settings.auth.mode = "tokens"
    settings.memory.extract_facts = False
    with served(settings, "memory") as url:
        async with as_user(url, issued["token"]) as client:
            started = await client.call_tool("start_session", {})
            assert not started.is_error and started.structured_content["user"] == "alice"
        assert main(["auth", "token", "revoke", issued["id"]]) == 0
        assert "revoked" in capsys.readouterr().out
        async with httpx2.AsyncClient(timeout=30) as http:
            response = await http.post(f"{url}/mcp", json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {issued['token']}"})
        assert response.status_code == 401
    assert main(["auth", "token", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["user"], t["revoked_at"] is not None) for t in listed] == [("alice", True)]


def test_unknown_scopes_and_missing_tokens_are_clear_errors(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth", "token", "create", "--user", "alice", "--scopes", "memory:reed"]) == 2
    assert "unknown scope(s) memory:reed" in capsys.readouterr().err
    assert main(["auth", "token", "revoke", "nope"]) == 1
    assert "auth token list" in capsys.readouterr().err
    store = TokenStore(settings.home)
    token, _ = store.create("alice", "memory:read")
    assert store.lookup(token) is not None
    assert store.lookup(token[:-1] + ("A" if token[-1] != "A" else "B")) is None  # one character off is refused


def test_serving_a_public_address_without_auth_is_refused_unless_asked(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "memory", "--transport", "http", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "without authentication" in err and '[auth] mode = "tokens"' in err and "--insecure-no-auth" in err


async def test_every_tool_of_every_server_declares_a_known_scope(settings: Settings) -> None:
    settings.router.mount = []  # the router's own tools; mounted ones are checked by their servers
    for name in serving.SERVER_NAMES:
        server = serving.build(name, settings)
        declared = server.hydrabrain_scopes.tools  # type: ignore[attr-defined]
        async with Client(server, cache=None) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
        assert tools and not tools - set(declared), f"{name}: tools without a scope: {sorted(tools - set(declared))}"
        assert set(declared.values()) <= set(SCOPES)


async def test_through_the_router_a_call_is_allowed_exactly_when_the_direct_call_would_be(settings: Settings, idp: IdentityProvider) -> None:
    jwt_settings(settings, idp)
    settings.router.mount = ["memory"]
    with served(settings, "router") as url:
        aud = f"{url}/mcp"
        async with as_user(url, idp.token("bob", "memory:read memory:write", aud)) as client:
            started = await client.call_tool("memory_start_session", {"task": "notes"})
            assert not started.is_error and started.structured_content["user"] == "bob"
            sid = started.structured_content["session_id"]
            assert not (await client.call_tool("memory_remember", {"session_id": sid, "text": "Bob's locker code is 4711."})).is_error
        async with as_user(url, idp.token("alice", "memory:read memory:write router:complete", aud)) as client:
            own = await client.call_tool("memory_recall", {"query": "locker code"})
            assert not own.is_error and "4711" not in json.dumps(own.structured_content)
            posing = await client.call_tool("memory_recall", {"query": "locker code", "user": "bob"})
            assert posing.is_error and "'admin' scope" in text(posing)
            with pytest.raises(Exception, match="admin"):
                await client.read_resource("memory://user/bob/facts")
            with pytest.raises(Exception, match="admin"):
                await client.read_resource(f"memory://session/{sid}")
        async with as_user(url, idp.token("carol", "router:complete", aud)) as client:
            # the memory server refuses it, as it would refuse carol's token directly
            with pytest.raises(MCPError, match="'memory:write' scope"):
                await client.call_tool("memory_start_session", {})


def test_a_slow_or_oversized_body_gets_408_or_413_before_the_server_reads_it(settings: Settings) -> None:
    import socket
    from urllib.parse import urlparse

    settings.auth.body_timeout_s = 1
    settings.auth.max_body_bytes = 2048
    settings.router.mount = []
    with served(settings, "router") as url:
        where = urlparse(url)
        with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
            sock.sendall(f"POST /mcp HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{{".encode())
            slow = b"".join(iter(lambda: sock.recv(4096), b""))  # the server answers and closes
        big = httpx2.post(f"{url}/mcp", content=b"x" * 5000, headers=MCP_HEADERS, timeout=30)
    assert slow.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in slow
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error_description"]


CHEAP_CALLS = {
    "wiki": ("lint", {}, "wiki:read"),
    "memory": ("recall", {"query": "anything"}, "memory:read"),
    "crag": ("evaluate", {"question": "What is Lumen?", "documents": ["Lumen is a cache."]}, "crag:read"),
    "loop": ("status", {}, "loop:run"),
    "router": ("route", {"task": "general"}, "router:complete"),
}


@pytest.mark.parametrize("name", list(CHEAP_CALLS))
async def test_each_server_over_http_wants_a_valid_token_with_its_tools_scope(name: str, settings: Settings, idp: IdentityProvider) -> None:
    jwt_settings(settings, idp)
    settings.router.mount = []
    settings.loop.memory = "off"
    tool, arguments, scope = CHEAP_CALLS[name]
    with served(settings, name) as url:
        aud = f"{url}/mcp"
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
        async with httpx2.AsyncClient(timeout=60) as http:
            anonymous = await http.post(aud, json=INITIALIZE, headers=MCP_HEADERS)
            expired = await http.post(aud, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {idp.token('alice', scope, aud, expires_in=-120)}"})
            other = "wiki:write" if scope != "wiki:write" else "memory:read"
            unscoped = await http.post(aud, json=call, headers={**MCP_HEADERS, "Authorization": f"Bearer {idp.token('alice', other, aud)}"})
        assert anonymous.status_code == 401 and expired.status_code == 401
        assert unscoped.status_code == 403 and f'scope="{scope}"' in unscoped.headers["www-authenticate"]
        async with as_user(url, idp.token("alice", scope, aud)) as client:
            assert tool in {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool(tool, arguments)
            assert not result.is_error, text(result)


async def test_a_loop_cycle_records_who_asked_for_it(settings: Settings, idp: IdentityProvider, tmp_path) -> None:
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "green"]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo, check=True, capture_output=True)
    jwt_settings(settings, idp)
    settings.loop.memory = "off"
    settings.loop.allowed_repos = [str(repo)]
    with served(settings, "loop") as url:
        async with as_user(url, idp.token("alice", "loop:run", f"{url}/mcp")) as client:
            cycle = await client.call_tool("run_once", {"repo": str(repo)})
            assert not cycle.is_error, text(cycle)
            run = json.loads((await client.read_resource(f"loop://runs/{cycle.structured_content['run_id']}")).contents[0].text)
    assert cycle.structured_content["by"] == "alice" and run["summary"]["by"] == "alice"
