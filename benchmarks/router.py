"""Router benchmark: routing overhead, gateway overhead, and cost saved by task-aware routing.

    python benchmarks/router.py [--calls 400]

1. Routing overhead per `LLM.complete` call, excluding the provider's own latency: the time spent
   in the client outside the HTTP request to a loopback OpenAI-compatible server (policy, budget
   check, cache lookup, ledger write, result building). Anchor: the HTTP request itself.
2. Gateway overhead per proxied tool call: a client calling an echo tool through the router
   against the same client calling the echo server directly, in memory and over stdio.
3. Cost on a mixed task workload routed by task and tier (balanced, cheapest) against always
   using the most capable model (quality=best), with the tiers each setting delivered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "router"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HYDRABRAIN_LOG_LEVEL"] = "WARNING"

from fake_providers import FakeLLMServer, ok  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.server import MCPServer  # noqa: E402

from hydrabrain.servers.router.aggregation import Mount  # noqa: E402
from hydrabrain.servers.router.server import build_server  # noqa: E402
from hydrabrain.shared.config import BudgetConfig, ModelPrice, ProviderConfig, load_settings  # noqa: E402
from hydrabrain.shared.llm import llm_from_settings  # noqa: E402
from hydrabrain.shared.llm.providers import Provider  # noqa: E402
from hydrabrain.shared.serving import new_server  # noqa: E402

ECHO = str(ROOT / "tests" / "router" / "echo_server.py")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def settings_with(home: Path, providers: list[ProviderConfig], **router: Any):
    settings = load_settings(home=home)
    section = settings.router.model_copy(update={"providers": providers, "mount": [], **router})
    return settings.model_copy(update={"router": section})


# --- 1. routing overhead --------------------------------------------------------------------------


async def routing_overhead(calls: int, home: Path) -> dict[str, Any]:
    fake = FakeLLMServer("openai").start()
    models = [
        ModelPrice(name="small", input_per_mtok=0.1, output_per_mtok=0.4, tasks={"general": 1, "bulk": 2}),
        ModelPrice(name="large", input_per_mtok=3, output_per_mtok=15, tasks={"general": 3, "code": 3, "reasoning": 3}),
    ]
    settings = settings_with(home, [ProviderConfig(name="p", base_url=fake.base_url, models=models)], exact_cache=False,
                             budgets=[BudgetConfig(tenant="bench", period="month", limit_usd=1000.0)])
    llm = llm_from_settings(settings)
    provider_time: list[float] = []
    original = Provider.complete

    async def timed(self, model, messages, max_tokens):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        try:
            return await original(self, model, messages, max_tokens)
        finally:
            provider_time.append(time.perf_counter() - started)

    Provider.complete = timed
    totals: list[float] = []
    direct: list[float] = []
    async with httpx.AsyncClient(trust_env=False) as plain:
        try:
            for i in range(calls + 20):
                prompt = f"request {i}: summarise the change log"
                provider_time.clear()
                started = time.perf_counter()
                await llm.complete(prompt=prompt, task="bulk" if i % 2 else "code", tenant="bench", feature="bench")
                total = time.perf_counter() - started
                # The anchor: the same request posted straight to the provider, no router.
                started = time.perf_counter()
                response = await plain.post(f"{fake.base_url}/chat/completions", json={"model": "small", "messages": [{"role": "user", "content": prompt}]})
                response.json()["choices"][0]["message"]["content"]
                straight = time.perf_counter() - started
                if i >= 20:  # warm-up
                    totals.append((total, sum(provider_time)))
                    direct.append(straight * 1000)
        finally:
            Provider.complete = original
            await llm.aclose()
            fake.stop()
    overhead = [(t - p) * 1000 for t, p in totals]
    http = [p * 1000 for _, p in totals]
    routed = [t * 1000 for t, _ in totals]
    return {
        "calls": calls,
        "overhead_ms_p50": pct(overhead, 50), "overhead_ms_p99": pct(overhead, 99),
        "provider_http_ms_p50": pct(http, 50), "provider_http_ms_p99": pct(http, 99),
        "routed_call_ms_p50": pct(routed, 50), "routed_call_ms_p99": pct(routed, 99),
        "direct_call_ms_p50": pct(direct, 50), "direct_call_ms_p99": pct(direct, 99),
        "overhead_over_http_p50": pct(overhead, 50) / pct(http, 50),
    }


# --- 2. gateway overhead --------------------------------------------------------------------------


def echo_server(suite: bool = False) -> MCPServer:
    """An echo tool on a bare SDK server, or on one built like the suite's servers (tracing middleware, logging)."""
    if suite:
        @asynccontextmanager
        async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
            yield None

        server = new_server("echo", instructions="Echoes.", lifespan=lifespan, settings=load_settings())
    else:
        server = MCPServer(name="echo")

    @server.tool()
    async def echo(text: str) -> str:
        """Return the text."""
        return text

    return server


async def time_calls(client: Client, tool: str, calls: int) -> list[float]:
    for _ in range(20):
        await client.call_tool(tool, {"text": "ping"})
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await client.call_tool(tool, {"text": "ping"})
        times.append((time.perf_counter() - started) * 1000)
        assert not result.is_error, result
    return times


def _pair(d: list[float], r: list[float]) -> dict[str, float]:
    return {"direct_ms_p50": pct(d, 50), "proxied_ms_p50": pct(r, 50), "direct_ms_p99": pct(d, 99),
            "proxied_ms_p99": pct(r, 99), "ratio_p50": pct(r, 50) / pct(d, 50)}


async def interleaved(direct: Client, direct_tool: str, routed: Client, routed_tool: str, calls: int, rounds: int = 10) -> dict[str, float]:
    """Alternate blocks of direct and proxied calls so load from other processes hits both alike."""
    d: list[float] = []
    r: list[float] = []
    for _ in range(rounds):
        d += await time_calls(direct, direct_tool, calls // rounds)
        r += await time_calls(routed, routed_tool, calls // rounds)
    return _pair(d, r)


async def gateway_overhead(calls: int, home: Path) -> dict[str, Any]:
    settings = settings_with(home, [])
    out: dict[str, Any] = {"calls": calls}
    for name, suite in (("in_memory_suite_server", True), ("in_memory_bare_sdk_server", False)):
        mount = Mount(prefix="echo", connect=lambda suite=suite, **kw: Client(echo_server(suite), cache=None, **kw), source="in-process")
        async with Client(echo_server(suite)) as direct, Client(build_server(settings, extra_mounts=[mount])) as routed:
            out[name] = await interleaved(direct, "echo", routed, "echo_echo", calls)

    # The suite's shape: the client reaches the router over stdio, the router holds the server in process.
    stdio_echo = StdioServerParameters(command=sys.executable, args=[ECHO, "stdio"])
    own = StdioServerParameters(command=sys.executable, args=[__file__, "--serve-router-with-echo", str(home / "served")],
                                env={**os.environ, "HYDRABRAIN_LOG_LEVEL": "WARNING"})
    suite_echo = StdioServerParameters(command=sys.executable, args=[__file__, "--serve-suite-echo"],
                                       env={**os.environ, "HYDRABRAIN_LOG_LEVEL": "WARNING"})
    async with Client(suite_echo) as direct, Client(own) as routed:
        out["stdio_to_in_process"] = await interleaved(direct, "echo", routed, "echo_echo", calls)

    # An external server: two stdio hops against one.
    env = {**os.environ, "HYDRABRAIN_HOME": str(home), "HYDRABRAIN_ROUTER_MOUNT": "[]", "HYDRABRAIN_LOG_LEVEL": "WARNING",
           "HYDRABRAIN_ROUTER_DOWNSTREAM": json.dumps([{"prefix": "echo", "command": [sys.executable, ECHO, "stdio"]}])}
    router_cmd = StdioServerParameters(command=sys.executable, args=["-m", "hydrabrain.servers.cli", "serve", "router"], env=env)
    async with Client(stdio_echo) as direct, Client(router_cmd) as routed:
        out["stdio_to_stdio"] = await interleaved(direct, "echo", routed, "echo_echo", calls)
    return out


# --- 3. cost on a mixed workload ------------------------------------------------------------------

# Three deployments as a team might configure them: the suite's local backend (free, bulk work only),
# a small hosted model, and a frontier model. Prices per million tokens, tiers per task.
WORKLOAD_MODELS = [
    ("backend", ModelPrice(name="smollm2-135m", context_window=8192, tasks={"bulk": 2, "summarise": 1, "classify": 2, "extract": 1})),
    ("hosted", ModelPrice(name="small-model", input_per_mtok=0.15, output_per_mtok=0.6, context_window=128_000,
                          tasks={"general": 2, "bulk": 2, "summarise": 2, "classify": 2, "extract": 2, "code": 2, "reasoning": 1, "agent": 2})),
    ("frontier", ModelPrice(name="frontier-model", input_per_mtok=3.0, output_per_mtok=15.0, context_window=200_000,
                            tasks={"general": 3, "bulk": 3, "summarise": 3, "classify": 3, "extract": 3, "code": 3, "reasoning": 3, "agent": 3})),
]
MIX = [("bulk", 0.25, 600, 60), ("summarise", 0.2, 4000, 300), ("classify", 0.1, 300, 5), ("extract", 0.1, 2000, 200),
       ("code", 0.15, 3000, 800), ("reasoning", 0.1, 2500, 1200), ("agent", 0.1, 5000, 400)]


async def workload_cost(n: int, home: Path) -> dict[str, Any]:
    fakes = {name: FakeLLMServer("openai").start() for name, _ in WORKLOAD_MODELS}
    providers = [ProviderConfig(name=name, base_url=fakes[name].base_url, models=[m]) for name, m in WORKLOAD_MODELS]
    rng = random.Random(7)
    jobs = []
    for i in range(n):
        task, _, in_tok, out_tok = rng.choices(MIX, weights=[m[1] for m in MIX])[0]
        jobs.append((i, task, int(in_tok * rng.uniform(0.5, 1.5)), int(out_tok * rng.uniform(0.5, 1.5))))
    results: dict[str, Any] = {"calls": n, "mix": {t: w for t, w, _, _ in MIX}}
    for quality in ("best", "balanced", "cheapest"):
        settings = settings_with(home / quality, providers, quality=quality, exact_cache=False)
        llm = llm_from_settings(settings)
        cost, tiers, by_model = 0.0, [], {}
        for i, task, in_tok, out_tok in jobs:
            for fake in fakes.values():
                fake.scripts.clear()
            # The fake bills exactly the sizes the job declares, whoever serves it.
            for name, m in WORKLOAD_MODELS:
                fakes[name].script(m.name, ok("answer", input_tokens=in_tok, output_tokens=out_tok))
            result = await llm.complete(prompt=f"job {i} " + "x" * min(in_tok * 4, 30_000), task=task, max_tokens=out_tok)
            cost += result.cost_usd
            tier = next(m.tasks.get(task, m.tasks.get("general")) for _, m in WORKLOAD_MODELS if m.name == result.model)
            tiers.append(tier)
            by_model[result.model] = by_model.get(result.model, 0) + 1
        await llm.aclose()
        results[quality] = {"cost_usd": cost, "mean_tier": statistics.mean(tiers), "calls_by_model": by_model,
                            "top_tier_share": sum(1 for t in tiers if t == 3) / len(tiers)}
    for fake in fakes.values():
        fake.stop()
    best = results["best"]["cost_usd"]
    for quality in ("balanced", "cheapest"):
        results[quality]["saved_vs_best"] = 1 - results[quality]["cost_usd"] / best
    return results


# --- report ---------------------------------------------------------------------------------------


async def main(calls: int, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        return {
            "routing": await routing_overhead(calls, home / "routing"),
            "gateway": await gateway_overhead(calls, home / "gateway"),
            "workload": await workload_cost(jobs, home / "workload"),
        }


def print_table(r: dict[str, Any]) -> None:
    ro = r["routing"]
    print(f"\nRouting overhead per complete() call ({ro['calls']} calls, provider latency excluded)")
    print(f"  {'':28}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"  {'router overhead':28}{ro['overhead_ms_p50']:>10.3f}{ro['overhead_ms_p99']:>10.3f}")
    print(f"  {'HTTP request inside it':28}{ro['provider_http_ms_p50']:>10.3f}{ro['provider_http_ms_p99']:>10.3f}")
    print(f"  {'whole routed call':28}{ro['routed_call_ms_p50']:>10.3f}{ro['routed_call_ms_p99']:>10.3f}")
    print(f"  {'anchor: direct httpx call':28}{ro['direct_call_ms_p50']:>10.3f}{ro['direct_call_ms_p99']:>10.3f}")
    print(f"  overhead / request (p50): {ro['overhead_over_http_p50']:.2f}")
    g = r["gateway"]
    print(f"\nGateway overhead per tool call ({g['calls']} calls)")
    print(f"  {'client -> router -> server':28}{'direct p50':>12}{'proxied p50':>13}{'direct p99':>12}{'proxied p99':>13}{'ratio p50':>11}")
    for name in ("in_memory_suite_server", "in_memory_bare_sdk_server", "stdio_to_in_process", "stdio_to_stdio"):
        x = g[name]
        print(f"  {name:28}{x['direct_ms_p50']:>12.3f}{x['proxied_ms_p50']:>13.3f}{x['direct_ms_p99']:>12.3f}{x['proxied_ms_p99']:>13.3f}{x['ratio_p50']:>11.2f}")
    w = r["workload"]
    print(f"\nMixed workload ({w['calls']} calls): cost against always using the most capable model")
    print(f"  {'quality':10}{'cost $':>10}{'saved':>8}{'mean tier':>11}{'top tier':>10}  calls by model")
    for q in ("best", "balanced", "cheapest"):
        x = w[q]
        saved = f"{x['saved_vs_best'] * 100:.1f}%" if "saved_vs_best" in x else "anchor"
        print(f"  {q:10}{x['cost_usd']:>10.4f}{saved:>8}{x['mean_tier']:>11.2f}{x['top_tier_share'] * 100:>9.0f}%  {x['calls_by_model']}")


def serve_router_with_echo(home: str) -> None:
    """The router over stdio with the echo server mounted in process, as the suite's servers are."""
    settings = settings_with(Path(home), [])
    mount = Mount(prefix="echo", connect=lambda **kw: Client(echo_server(suite=True), cache=None, **kw), source="in-process")
    build_server(settings, extra_mounts=[mount]).run("stdio")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-router-with-echo":
        serve_router_with_echo(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) == 2 and sys.argv[1] == "--serve-suite-echo":
        echo_server(suite=True).run("stdio")
        sys.exit(0)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    results = anyio.run(main, args.calls, args.jobs)
    print_table(results)
    out = ROOT / "benchmarks" / "results" / "router.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": f"python benchmarks/router.py --calls {args.calls} --jobs {args.jobs}", "cpus": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out.write_text(json.dumps({**meta, **results}, indent=2) + "\n")
    print(f"\nraw results: {out.relative_to(ROOT)}")
