"""Run the official MCP conformance scenarios against the wiki over streamable HTTP.

Starts `hydrabrain serve wiki --transport http` on a free 127.0.0.1 port with a throwaway data home,
runs `npx --yes @modelcontextprotocol/conformance@0.1.11 server --url ... --scenario NAME` for each
scenario, prints a table, and exits non-zero if any scenario fails or the server does not start.

    python scripts/conformance.py [--scenario NAME ...] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "@modelcontextprotocol/conformance@0.1.11"
SCENARIOS = (
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
    "logging-set-level",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the wiki server exited with status {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"the wiki server did not listen on port {port} within {timeout:.0f} s")


def hydrabrain_command() -> list[str]:
    exe = shutil.which("hydrabrain", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "hydrabrain.servers.cli"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per scenario (default 180)")
    args = parser.parse_args(argv)
    if shutil.which("npx") is None:
        print("npx is not on PATH: install Node.js 18 or newer to run the conformance suite", file=sys.stderr)
        return 2

    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with tempfile.TemporaryDirectory(prefix="hydrabrain-conformance-") as home:
        env = {**os.environ, "HYDRABRAIN_HOME": home, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HYDRABRAIN_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [*hydrabrain_command(), "serve", "wiki", "--transport", "http", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        results: list[tuple[str, bool, str]] = []
        try:
            wait_for(port, server, 120)
            for scenario in args.scenario or SCENARIOS:
                started = time.monotonic()
                try:
                    run = subprocess.run(
                        ["npx", "--yes", SUITE, "server", "--url", url, "--scenario", scenario],
                        capture_output=True, text=True, timeout=args.timeout, env={**os.environ, "NO_COLOR": "1"},
                    )
                    ok = run.returncode == 0
                    output = (run.stdout + run.stderr).strip()
                except subprocess.TimeoutExpired:
                    ok, output = False, f"timed out after {args.timeout:.0f} s"
                results.append((scenario, ok, f"{time.monotonic() - started:.1f} s"))
                if not ok:
                    print(f"--- {scenario} failed ---\n{output[-4000:]}\n", file=sys.stderr)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
    width = max(len(name) for name, _, _ in results) if results else 10
    print(f"{'scenario'.ljust(width)}  result  time")
    for name, ok, took in results:
        print(f"{name.ljust(width)}  {'pass' if ok else 'FAIL'}    {took}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} scenarios passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
