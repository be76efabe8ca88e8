"""What bearer-token checking costs a tool call over HTTP: p50 latency with JWT verification against without.

Two routers (no mounts, so the call stays cheap and what differs is the door) are served over
streamable HTTP on loopback in this process: one with `[auth] mode = "none"`, one with
`mode = "jwt"` against a JWKS endpoint on loopback. One official client session each calls the
cheap `route` tool; calls alternate between the two so drift in the machine's load hits both
alike. Reported: p50 and p90 per side and the ratio of the p50s (goal: under 1.2x). API tokens
(`mode = "tokens"`) are measured the same way as a third column.

    python benchmarks/auth_overhead.py --calls 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from hydrabrain.shared import serving
from hydrabrain.shared.auth import TokenStore
from hydrabrain.shared.config import load_settings

ROOT = Path(__file__).resolve().parent


def _jwks_app(key: Any) -> Starlette:
    """An identity provider's JWKS endpoint, publishing `key` under the kid "bench"."""
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": "bench", "use": "sig", "alg": "RS256"}
    return Starlette(routes=[Route("/jwks.json", lambda request: JSONResponse({"keys": [jwk]}))])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(urls: dict[str, tuple[str, str | None]], calls: int, warmup: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in urls}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, (url, token) in urls.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            transport = streamable_http_client(f"{url}/mcp", http_client=httpx2.AsyncClient(headers=headers, timeout=60))
            clients[name] = await stack.enter_async_context(Client(transport, cache=None))
        for i in range(warmup + calls):
            for name, client in clients.items():  # alternate, so load drift hits every side alike
                started = time.perf_counter()
                result = await client.call_tool("route", {"task": "general", "prompt": "hello"})
                elapsed = (time.perf_counter() - started) * 1000
                if result.is_error:
                    raise RuntimeError(f"{name}: {result.content[0].text}")
                if i >= warmup:
                    timings[name].append(elapsed)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="measured calls per side")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "results" / "auth_overhead.json"))
    args = parser.parse_args(argv)
    command = "python benchmarks/auth_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory() as home, serving.in_background(_jwks_app(key)) as issuer:
        base = {"home": home, "log_level": "WARNING", "router": {"mount": []}}
        ports = {name: serving.free_port() for name in ("none", "jwt", "tokens")}
        settings = {
            "none": load_settings(**base, auth={"mode": "none", "public_url": f"http://127.0.0.1:{ports['none']}"}),
            "jwt": load_settings(**base, auth={"mode": "jwt", "issuer": issuer, "jwks_url": f"{issuer}/jwks.json",
                                               "public_url": f"http://127.0.0.1:{ports['jwt']}"}),
            "tokens": load_settings(**base, auth={"mode": "tokens", "public_url": f"http://127.0.0.1:{ports['tokens']}"}),
        }
        now = int(time.time())
        claims = {"sub": "bench", "scope": "router:complete", "aud": f"http://127.0.0.1:{ports['jwt']}/mcp", "iss": issuer, "iat": now, "exp": now + 3600}
        tokens = {"none": None, "jwt": jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"}),
                  "tokens": TokenStore(Path(home)).create("bench", "router:complete")[0]}
        with contextlib.ExitStack() as stack:
            urls = {name: (stack.enter_context(serving.in_background(serving.http_app(serving.build("router", cfg)), port=ports[name])), tokens[name])
                    for name, cfg in settings.items()}
            timings = anyio.run(_measure, urls, args.calls, args.warmup)

    rows = {name: {"p50_ms": round(statistics.median(t), 3), "p90_ms": round(_percentile(t, 0.9), 3), "calls": len(t)} for name, t in timings.items()}
    result = {
        "command": command,
        "tool": "router.route over streamable HTTP, official client, loopback",
        "rows": rows,
        "jwt_over_none_p50": round(rows["jwt"]["p50_ms"] / rows["none"]["p50_ms"], 3),
        "tokens_over_none_p50": round(rows["tokens"]["p50_ms"] / rows["none"]["p50_ms"], 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("| auth | p50 ms | p90 ms | calls |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {row['calls']} |")
    print(f"jwt / none p50: {result['jwt_over_none_p50']}x; tokens / none: {result['tokens_over_none_p50']}x (goal under 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
