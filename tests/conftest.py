"""Fixtures every test shares: an isolated data home, settings, and the Bolt graph server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: every Triton kernel a test reaches runs in the interpreter. Set before anything
# imports triton, since the flag is read when a kernel module is first loaded.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hydrabrain.shared.config import Settings, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data home and no stray config file."""
    home = tmp_path / "home"
    monkeypatch.setenv("HYDRABRAIN_HOME", str(home))
    monkeypatch.delenv("HYDRABRAIN_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def settings(isolated_home: Path) -> Settings:
    return load_settings()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def bolt_url() -> Iterator[str]:
    """The Bolt server `make test` starts; started here when pytest runs on its own."""
    url = os.environ.get("HYDRABRAIN_TEST_BOLT_URL", "bolt://127.0.0.1:17687")
    port = int(url.rsplit(":", 1)[1])
    started = False
    if not _listening(port):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "graph_server.py"), "start"], check=True)
        started = True
    yield url
    if started:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "graph_server.py"), "stop"], check=False)
