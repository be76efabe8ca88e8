"""Every tool call leaves a span and a log line; the command line explains itself."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import Client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hydrabrain.servers.cli import main
from hydrabrain.shared.config import Settings
from hydrabrain.shared.serving import new_server

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def recording_tracer() -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_exporter))


def _echo_server(settings: Settings):
    @asynccontextmanager
    async def lifespan(_server):
        yield {}

    server = new_server("probe", instructions="test", lifespan=lifespan, settings=settings)

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @server.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("this tool always fails")

    return server


@pytest.mark.anyio
async def test_each_tool_call_is_traced_with_tool_latency_and_outcome(settings: Settings, capfd: pytest.CaptureFixture[str]) -> None:
    _exporter.clear()
    async with Client(_echo_server(settings)) as client:
        ok = await client.call_tool("echo", {"text": "hi"})
        bad = await client.call_tool("fail", {})
    assert not ok.is_error and bad.is_error
    spans = {s.name: s for s in _exporter.get_finished_spans() if s.name.startswith("probe.")}
    assert spans["probe.echo"].attributes["mcp.outcome"] == "ok"
    assert spans["probe.fail"].attributes["mcp.outcome"] == "tool_error"
    assert spans["probe.echo"].attributes["mcp.latency_ms"] >= 0
    out, err = capfd.readouterr()
    assert out == ""  # stdout belongs to the stdio transport
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert {(entry["tool"], entry["outcome"]) for entry in lines if entry.get("msg") == "tool call"} >= {("echo", "ok"), ("fail", "tool_error")}


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("serve", "doctor", "config"):
        assert command in text


def test_serve_help_names_the_transports(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "streamable HTTP" in capsys.readouterr().out


def test_doctor_passes_on_the_embedded_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    report = capsys.readouterr().out
    assert "embedded Qdrant Edge" in report and "embedded SQLite" in report


def test_doctor_names_an_unreachable_graph_server_and_the_fix(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRABRAIN_GRAPH_URL", "bolt://127.0.0.1:9")
    assert main(["doctor"]) == 1
    report = capsys.readouterr().out
    assert "FAIL graph" in report and "graph.url" in report


def test_a_configuration_error_exits_cleanly_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "hydrabrain.toml").write_text("[wiki]\nnot_a_setting = 1\n")
    done = subprocess.run([sys.executable, "-m", "hydrabrain.servers.cli", "doctor"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "not_a_setting" in done.stderr and "Traceback" not in done.stderr


def test_config_lists_every_setting_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    assert "HYDRABRAIN_WIKI_MAX_SOURCE_BYTES" in capsys.readouterr().out
