"""`make demo`: ingest the sample corpus, then drive every server of the suite through a real MCP
client over stdio, launched exactly as mcp.json says, and print a readable transcript.

Runs on the embedded defaults in a fresh data home (./.hydrabrain/demo), so it needs no server,
no key and no network.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("wiki", "memory", "crag", "loop", "router")


def say(line: str = "") -> None:
    print(textwrap.indent(line, "  ") if line else "", flush=True)


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def server_params(name: str, env: dict[str, str]) -> StdioServerParameters:
    """The launch line for `name` from mcp.json, with this environment added."""
    spec = json.loads((ROOT / "mcp.json").read_text())["mcpServers"][f"hydrabrain-{name}"]
    command = shutil.which(spec["command"], path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if command is None:
        raise SystemExit(f"{spec['command']!r} is not on PATH; run `make install` first")
    return StdioServerParameters(command=command, args=spec["args"], env={**env, **spec.get("env", {})})


async def drive(name: str, env: dict[str, str]) -> bool:
    try:
        module = importlib.import_module(f"hydrabrain.servers.{name}.demo")
    except ModuleNotFoundError:
        return False
    banner(f"{name} over stdio: hydrabrain serve {name}")
    started = time.perf_counter()
    async with Client(server_params(name, env), read_timeout_seconds=300) as client:
        tools = await client.list_tools()
        say(f"tools: {', '.join(t.name for t in tools.tools)}")
        await module.run(client, say)
    say(f"({time.perf_counter() - started:.1f} s)")
    return True


def start_backend(env: dict[str, str], port: int) -> subprocess.Popen | None:
    """`hydrabrain backend serve` on SmolLM2-135M-Instruct, once it answers /v1/models; None if it cannot start."""
    banner(f"inference backend: hydrabrain backend serve --model smollm2-135m --port {port}")
    process = subprocess.Popen(
        [sys.executable, "-m", "hydrabrain.servers.cli", "backend", "serve", "--model", "smollm2-135m", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            say(f"the backend exited with status {process.returncode}; the router runs in plain mode")
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                models = json.load(response)["data"]
            say(f"serving {', '.join(m['id'] for m in models)} on http://127.0.0.1:{port}/v1 (OpenAI-compatible)")
            return process
        except OSError:
            time.sleep(1)
    process.terminate()
    say("the backend did not answer within 240 s; the router runs in plain mode")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hydrabrain.servers.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".hydrabrain/demo", help="data home for the demo (wiped first)")
    parser.add_argument("--only", nargs="*", choices=ORDER, help="drive only these servers")
    parser.add_argument("--no-backend", action="store_true", help="do not start the inference backend for the router")
    parser.add_argument("--backend-port", type=int, default=8808, help="port for the inference backend (default 8808)")
    args = parser.parse_args(argv)

    home = Path(args.home).resolve()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env = {
        **os.environ,
        "HYDRABRAIN_HOME": str(home),
        "HYDRABRAIN_WIKI_ALLOWED_ROOTS": str(ROOT / "examples"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The servers' JSON logs share the terminal with the transcript: keep only warnings.
        "HYDRABRAIN_LOG_LEVEL": os.environ.get("HYDRABRAIN_LOG_LEVEL", "WARNING"),
    }
    os.environ.update(env)
    names = args.only or list(ORDER)

    if "wiki" in names and (ROOT / "examples" / "corpus").is_dir():
        banner("ingest the sample corpus: hydrabrain wiki ingest examples/corpus")
        subprocess.run([sys.executable, "-m", "hydrabrain.servers.cli", "wiki", "ingest", str(ROOT / "examples" / "corpus")], check=True, env=env)

    shown = [name for name in names if name != "router" and asyncio.run(drive(name, env))]
    if "router" in names:
        backend = None if args.no_backend else start_backend(env, args.backend_port)
        router_env = dict(env)
        if backend is not None:
            # The router routes summarising and bulk work to the suite's own backend.
            router_env.update(HYDRABRAIN_ROUTER_BACKEND="true", HYDRABRAIN_BACKEND_PORT=str(args.backend_port))
        try:
            if asyncio.run(drive("router", router_env)):
                shown.append("router")
        finally:
            if backend is not None:
                backend.terminate()
                backend.wait(timeout=30)
    banner("done")
    say(f"servers shown: {', '.join(shown) or 'none'}; data home: {home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
