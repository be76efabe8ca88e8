"""Moving over from the reference memory server: its JSONL knowledge graph in and out, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hydrabrain.servers.cli import main
from hydrabrain.servers.memory.core import MemoryService
from hydrabrain.shared.config import Settings

GRAPH = [
    {"type": "entity", "name": "John_Smith", "entityType": "person", "observations": ["Speaks fluent Spanish", "Graduated in 2019"]},
    {"type": "entity", "name": "Anthropic", "entityType": "organization", "observations": []},
    {"type": "entity", "name": "Rust", "entityType": "language", "observations": ["Used for the ingest daemon"]},
    {"type": "relation", "from": "John_Smith", "to": "Anthropic", "relationType": "works_at"},
    {"type": "relation", "from": "John_Smith", "to": "Rust", "relationType": "knows"},
    {"type": "relation", "from": "John_Smith", "to": "Python", "relationType": "knows"},
]


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def normalise(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        item = json.loads(line)
        if item["type"] == "entity":
            item["observations"] = sorted(item["observations"])
        out.add(json.dumps(item, sort_keys=True))
    return out


def test_a_reference_knowledge_graph_imports_and_exports_unchanged(tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "memory.jsonl", GRAPH)
    assert main(["memory", "import", str(source), "--user", "john"]) == 0
    assert "3 observations, 3 relations" in capsys.readouterr().out
    out = tmp_path / "export.jsonl"
    assert main(["memory", "export", "--user", "john", "--out", str(out)]) == 0

    expected = GRAPH + [{"type": "entity", "name": "Python", "entityType": "entity", "observations": []}]
    assert normalise(out.read_text().splitlines()) == normalise([json.dumps(r) for r in expected])

    service = MemoryService(settings)
    try:
        hits = service.recall("Which languages does John Smith speak?", "john", k=5)
        assert "John_Smith: Speaks fluent Spanish" in [h.text for h in hits]
        assert sorted(f.object for f in service.facts("john") if f.predicate == "knows") == ["Python", "Rust"]
        assert service.facts("someone_else") == []
    finally:
        service.close()


def test_a_malformed_file_is_refused_by_line_and_nothing_is_imported(tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "bad.jsonl", [GRAPH[0], GRAPH[3], '{"type": "relation", "from": "A", "relationType": "knows"}'])
    assert main(["memory", "import", str(source), "--user", "john"]) == 2
    assert "line 3: to" in capsys.readouterr().err
    write(tmp_path / "bad2.jsonl", [GRAPH[0], "not json"])
    assert main(["memory", "import", str(tmp_path / "bad2.jsonl"), "--user", "john"]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err

    service = MemoryService(settings)
    try:
        assert service.log.count("john") == 0 and service.facts("john") == [] and service.log.sessions("john") == []
    finally:
        service.close()


def test_consolidate_and_recall_run_from_the_command_line(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    service = MemoryService(settings)
    try:
        sid = service.start_session("dev").id
        for n in range(3):
            service.remember(sid, f"Bumping the gRPC version did not fix the TLS handshake error (try {n}).", kind="attempt")
    finally:
        service.close()
    assert main(["memory", "consolidate", "--user", "dev"]) == 0
    out = capsys.readouterr().out
    assert "1 lessons created" in out and "Dead end (failed 3 times)" in out
    assert main(["memory", "recall", "TLS handshake error", "--user", "dev", "-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and rows[0]["type"] == "lesson"
