"""The wiki served as `hydrabrain serve wiki` over streamable HTTP and over SSE, with a real client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.sse import sse_client

ALPHA = "# Alpha Service\n\nAlpha Service sends invoices every night for Team Kite.\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(isolated_home: Path) -> Iterator:  # noqa: ANN001
    started: list[subprocess.Popen] = []

    def start(transport: str) -> int:
        port = _free_port()
        command = shutil.which("hydrabrain", path=str(Path(sys.executable).parent)) or "hydrabrain"
        env = {**os.environ, "HYDRABRAIN_HOME": str(isolated_home), "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen([command, "serve", "wiki", "--transport", transport, "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
        started.append(process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, "the server exited early"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.2)
        raise AssertionError(f"nothing listened on {port}")

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.anyio
async def test_the_wiki_answers_over_streamable_http(serve) -> None:  # noqa: ANN001
    port = serve("http")
    async with Client(f"http://127.0.0.1:{port}/mcp") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        ingested = await client.call_tool("ingest", {"source": ALPHA})
        page = await client.read_resource("wiki://page/alpha-service")
    assert {"ingest", "search", "ask", "write_page", "lint", "maintain"} == tools
    assert ingested.structured_content["source_id"] == "alpha-service"
    assert "[^alpha-service]" in page.contents[0].text


@pytest.mark.anyio
async def test_the_wiki_answers_over_sse(serve) -> None:  # noqa: ANN001
    port = serve("sse")
    async with Client(sse_client(f"http://127.0.0.1:{port}/sse")) as client:
        report = await client.call_tool("lint", {})
        index = await client.read_resource("wiki://index")
    assert not report.is_error and report.structured_content["pages"] == 0
    assert index.contents[0].text.startswith("# Index")
