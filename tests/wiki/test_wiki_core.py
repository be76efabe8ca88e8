"""The wiki engine on its own: bad input, faults, concurrent writers, staleness, reindex, Bolt and the CLI."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydrabrain.servers.cli import main as cli_main
from hydrabrain.servers.wiki import store
from hydrabrain.servers.wiki.core import ConflictError, Wiki
from hydrabrain.servers.wiki.markdown import SlugError
from hydrabrain.shared.config import Settings
from hydrabrain.shared.safety import UnsafeInput

ALPHA = "# Alpha Service\n\nAlpha Service sends invoices every night. It is owned by Team Kite and runs in Kubernetes.\n"
BETA = "# Beta Service\n\nBeta Service reads invoices from Alpha Service. Team Kite also owns Beta Service since May.\n\nSee [[alpha-service]].\n"


@pytest.fixture
def wiki(settings: Settings, tmp_path: Path) -> Iterator[Wiki]:
    settings.wiki.allowed_roots = [tmp_path / "allowed"]
    (tmp_path / "allowed").mkdir()
    opened = Wiki(settings)
    yield opened
    opened.close()


def test_ingesting_text_stores_the_source_compiles_pages_logs_and_commits(wiki: Wiki) -> None:
    first = wiki.ingest(ALPHA)
    second = wiki.ingest(BETA)
    assert (first.source_id, first.status) == ("alpha-service", "created")
    assert second.pages_created == ["beta-service", "team-kite"]
    assert "alpha-service" in second.pages_updated  # now links to the new entity page
    files = wiki.files
    assert (files.raw_dir / "alpha-service.md").read_text() == ALPHA
    entity = files.read_page("team-kite") or ""
    assert "[^alpha-service]" in entity and "[^beta-service]" in entity and "[[beta-service]]" in entity
    log = files.log_file.read_text()
    assert re.findall(r"^## \[\d{4}-\d{2}-\d{2}\] (\w+) \| (.+)$", log, re.M) == [("ingest", "Alpha Service"), ("ingest", "Beta Service")]
    assert files.git("log", "--format=%s").split("\n")[:2] == ["ingest: Beta Service", "ingest: Alpha Service"]
    assert "[[team-kite]]" in files.index_file.read_text()
    assert wiki.ingest(ALPHA).status == "unchanged"


def test_a_file_outside_the_allowed_folders_is_refused(wiki: Wiki, tmp_path: Path) -> None:
    outside = tmp_path / "secret.md"
    outside.write_text("# Secret\n\nThe vault code is 1234.\n")
    with pytest.raises(UnsafeInput, match="outside the allowed folders"):
        wiki.ingest(str(outside))
    assert wiki.files.source_ids() == []


def test_a_symlink_that_leaves_the_allowed_folder_is_refused(wiki: Wiki, tmp_path: Path) -> None:
    target = tmp_path / "secret.md"
    target.write_text("# Secret\n\nNot for the wiki.\n")
    link = tmp_path / "allowed" / "innocent.md"
    link.symlink_to(target)
    with pytest.raises(UnsafeInput, match="outside the allowed folders"):
        wiki.ingest(str(link))


def test_a_file_inside_the_allowed_folder_is_ingested_under_its_heading(wiki: Wiki, tmp_path: Path) -> None:
    path = tmp_path / "allowed" / "alpha.md"
    path.write_text(ALPHA)
    result = wiki.ingest(str(path))
    assert result.source_id == "alpha-service"
    assert (wiki.files.source_meta("alpha-service") or {})["origin"] == str(path.resolve())


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x00\x01binary\x00", "looks binary"), ("caf\u00e9 na\u00efve".encode("latin-1"), "not valid UTF-8")],
)
def test_binary_and_non_utf8_files_are_refused(wiki: Wiki, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "allowed" / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UnsafeInput, match=message):
        wiki.ingest(str(path))
    assert wiki.files.source_ids() == []


def test_an_oversized_source_is_refused_with_the_setting_to_change(wiki: Wiki, tmp_path: Path) -> None:
    wiki.config.max_source_bytes = 40
    path = tmp_path / "allowed" / "big.md"
    path.write_text(ALPHA)
    with pytest.raises(UnsafeInput, match="max_source_bytes"):
        wiki.ingest(str(path))
    with pytest.raises(UnsafeInput, match="max_source_bytes"):
        wiki.ingest(ALPHA)


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b"<html><head><title>Gamma Notes</title><script>alert(1)</script></head><body><p>Gamma Service ships parcels for Team Kite.</p></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_site() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/notes.html"
    httpd.shutdown()
    httpd.server_close()


def test_a_loopback_url_is_refused_unless_private_urls_are_allowed(wiki: Wiki, local_site: str) -> None:
    with pytest.raises(UnsafeInput, match="allow_private_urls"):
        wiki.ingest(local_site)
    wiki.config.allow_private_urls = True
    result = wiki.ingest(local_site)
    assert result.source_id == "gamma-notes"
    raw = wiki.files.source_text("gamma-notes") or ""
    assert "Gamma Service ships parcels" in raw and "alert(1)" not in raw


def test_an_unreachable_url_is_a_clear_error(wiki: Wiki) -> None:
    wiki.config.allow_private_urls = True
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        wiki.ingest(f"http://127.0.0.1:{port}/gone")


@pytest.mark.parametrize("slug", ["../escape", "/etc/passwd", "a/b", "Upper", "", "x" * 81])
def test_slugs_that_are_not_plain_page_names_are_refused(wiki: Wiki, slug: str) -> None:
    with pytest.raises(SlugError, match="invalid slug"):
        wiki.write_page(slug, "# Page\n\nText.")
    with pytest.raises(SlugError):
        wiki.read_page(slug)


def test_a_page_file_that_is_a_symlink_is_never_followed(wiki: Wiki, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.md"
    outside.write_text("outside")
    (wiki.files.pages_dir / "trap.md").symlink_to(outside)
    with pytest.raises(store.WikiPathError, match="symbolic link"):
        wiki.write_page("trap", "# Trap\n\nOverwrite?")
    assert outside.read_text() == "outside"


def test_concurrent_writers_with_the_same_base_lose_nothing_silently(wiki: Wiki) -> None:
    wiki.ingest(ALPHA)
    base = wiki.write_page("shared", "# Shared\n\nFirst version.[^alpha-service]").hash
    outcomes: list[str] = []

    def writer(n: int, base_hash: str | None) -> None:
        try:
            wiki.write_page("shared", f"# Shared\n\nVersion {n}.[^alpha-service]", base_hash=base_hash)
            outcomes.append(f"ok {n}")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(n, base)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split()[0] for o in outcomes) == ["conflict", "conflict", "conflict", "ok"]

    threads = [threading.Thread(target=writer, args=(n, None)) for n in range(10, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits = wiki.files.git("log", "--format=%s", "--", "pages/shared.md").split()
    assert len([c for c in wiki.files.git("log", "--format=%s", "--", "pages/shared.md").splitlines()]) == 6
    assert commits
    final = wiki.read_page("shared")
    assert re.search(r"Version 1[0-3]\.", final) and final.count("---\n") == 2


def test_a_page_older_than_a_new_version_of_its_source_is_stale_and_maintain_marks_it(wiki: Wiki) -> None:
    wiki.ingest(ALPHA)
    wiki.write_page("alpha-notes", "# Alpha notes\n\nAlpha sends invoices nightly.[^alpha-service]")
    newer = wiki.ingest(ALPHA.replace("every night", "every hour"))
    assert (newer.status, newer.source_id) == ("updated", "alpha-service")
    report = wiki.lint()
    assert [(s.page, s.newer_sources) for s in report.stale_pages] == [("alpha-notes", ["alpha-service"])]
    result = wiki.maintain()
    assert result.marked_stale == ["alpha-notes"]
    assert "stale: true" in wiki.read_page("alpha-notes")
    assert any(item.startswith("stale page alpha-notes") for item in result.needs_writer)


def test_uncited_claims_and_missing_concept_pages_are_linted_and_stubbed(wiki: Wiki) -> None:
    wiki.ingest(ALPHA)
    wiki.write_page("ops-one", "# Ops one\n\nThe Gridlock Monitor watches Alpha Service around the clock.")
    wiki.write_page("ops-two", "# Ops two\n\nOur Gridlock Monitor pages the team when invoices stall.[^alpha-service]")
    report = wiki.lint()
    assert [(c.page, c.sentence) for c in report.uncited_claims] == [("ops-one", "The Gridlock Monitor watches Alpha Service around the clock.")]
    assert [(m.slug, m.mentioned_in) for m in report.missing_pages] == [("gridlock-monitor", ["ops-one", "ops-two"])]
    assert set(report.orphans) >= {"ops-one", "ops-two"}
    result = wiki.maintain()
    assert result.stubs_created == ["gridlock-monitor"] and result.marked_unsupported == ["ops-one"]
    assert "unsupported_claims: 1" in wiki.read_page("ops-one")
    assert wiki.lint().missing_pages == []


def test_a_crash_while_writing_leaves_the_old_page_whole_and_reindex_rebuilds_search(wiki: Wiki, monkeypatch: pytest.MonkeyPatch) -> None:
    wiki.ingest(ALPHA)
    before = wiki.read_page("alpha-service")
    real_replace = store.os.replace

    def crash(src: str, dst: str) -> None:
        if str(dst).endswith("alpha-service.md") and "/pages/" in str(dst):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        wiki.ingest(ALPHA.replace("every night", "twice a day"))
    monkeypatch.setattr(store.os, "replace", real_replace)
    assert wiki.read_page("alpha-service") == before
    assert not list(wiki.files.pages_dir.glob(".*.tmp"))

    wiki.retriever.remove(where={"kind": ["chunk", "page"]})
    wiki.lexical.clear()
    assert wiki.search("invoices").hits == []
    rebuilt = wiki.reindex()
    assert rebuilt.sources == 1 and rebuilt.pages == 1 and rebuilt.items >= 2
    assert any("alpha-service" in hit.source_ids for hit in wiki.search("who sends invoices").hits)


def test_the_wiki_graph_works_on_the_bolt_backend(settings: Settings, tmp_path: Path, bolt_url: str) -> None:
    settings.graph.url = bolt_url
    wiki = Wiki(settings)
    try:
        wiki.graph.clear()
        wiki.ingest(ALPHA)
        wiki.ingest(BETA)
        cites = {e.dst for e in wiki.graph.edges(src="page:team-kite", rel="cites")}
        links = {e.dst for e in wiki.graph.edges(src="page:beta-service", rel="links")}
        assert cites == {"source:alpha-service", "source:beta-service"}
        assert {"page:alpha-service", "page:team-kite"} <= links
        hits = wiki.search("who reads invoices", k=5).hits
        assert hits and any("beta-service" in h.source_ids for h in hits)
    finally:
        wiki.graph.clear()
        wiki.close()


def test_the_cli_ingests_a_folder_with_progress_then_lints_maintains_reindexes_and_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "alpha.md").write_text(ALPHA)
    (folder / "beta.md").write_text(BETA)
    (folder / "image.png").write_bytes(b"\x89PNG\x00")
    monkeypatch.setenv("HYDRABRAIN_WIKI_ALLOWED_ROOTS", str(tmp_path))
    assert cli_main(["wiki", "ingest", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "2 sources: 2 created" in out and "ingest" in err and "2/2" in err
    assert cli_main(["wiki", "lint"]) == 0
    assert "2 sources" in capsys.readouterr().out
    assert cli_main(["wiki", "maintain"]) == 0
    assert "items need a writer" in capsys.readouterr().out
    assert cli_main(["wiki", "reindex"]) == 0
    assert "reindexed 2 sources" in capsys.readouterr().out
    assert cli_main(["wiki", "ask", "Who owns Beta Service?"]) == 0
    assert "[^beta-service]" in capsys.readouterr().out
    assert cli_main(["wiki", "ingest", str(tmp_path / "missing.md")]) == 1
    assert "no file at" in capsys.readouterr().out


def test_the_wiki_indexes_into_a_qdrant_server_through_qdrant_client(settings: Settings) -> None:
    settings.vectors.url = ":memory:"  # qdrant-client's in-process mode answers the server's API
    wiki = Wiki(settings)
    try:
        wiki.ingest(ALPHA)
        wiki.ingest(BETA)
        wiki.ingest(BETA.replace("since May", "since June"))  # a new version replaces the old passages
        assert wiki.vectors.count({"kind": "chunk", "source_id": "beta-service"}) == 1
        hits = wiki.search("who reads invoices from Alpha", k=5).hits
        assert hits and any("beta-service" in h.source_ids for h in hits)
        assert "since June" in " ".join(h.snippet for h in hits if h.id.startswith("chunk:beta-service"))
    finally:
        wiki.close()
