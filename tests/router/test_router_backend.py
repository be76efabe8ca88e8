"""The router reaching the suite's own inference backend over its OpenAI-compatible API, for real."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from hydrabrain.shared.llm import llm_from_settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def backend_port():
    """`hydrabrain backend serve` with the packaged SmolLM2-135M, started once for this module."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hydrabrain.servers.cli", "backend", "serve", "--port", str(port), "--kv-blocks", "256", "--max-batch", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the backend exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the backend did not come up within 240 s")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_the_router_routes_bulk_work_to_the_local_backend_and_bills_nothing(settings, backend_port, monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = settings.model_copy(update={
        "router": settings.router.model_copy(update={"backend": True}),
        "backend": settings.backend.model_copy(update={"port": backend_port}),
    })
    llm = llm_from_settings(settings)
    decision = llm.route("bulk", "Name a colour.")
    assert [c.deployment.key for c in decision.chain] == ["backend/smollm2-135m"]
    result = await llm.complete(prompt="Name a colour.", task="bulk", max_tokens=8, feature="tests.backend")
    assert result.provider == "backend" and result.model == "smollm2-135m"
    assert result.text.strip() and 1 <= result.output_tokens <= 8 and result.input_tokens > 0
    assert result.cost_usd == 0 and result.fallbacks_tried == []
    streamed = [e async for e in llm.stream(prompt="Name a fruit.", task="bulk", max_tokens=6)]
    assert streamed[-1].completion.text == "".join(e.text for e in streamed[:-1]) and streamed[-1].completion.text.strip()
    await llm.aclose()
