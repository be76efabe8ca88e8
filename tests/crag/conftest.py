"""Fixtures for the CRAG tests: a local wiki index in the wiki's layout and a loopback web-search server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hydrabrain.shared.config import Settings
from hydrabrain.shared.embeddings import Embedder, get_embedder

from searx_server import SearchServer
from wiki_layout import index_wiki

HERE = Path(__file__).resolve().parent

LOCAL_SOURCES = {
    "lumen-cache-md": (
        "Lumen cache",
        "# Lumen cache\n\nLumen is the in-process cache the ingest service uses.\n\n"
        "## Eviction\n\nThe Lumen cache evicts entries after 90 seconds unless they are pinned. "
        "Pinned entries stay until the process restarts.\n\n"
        "## Sizing\n\nLumen holds at most 50,000 entries; the oldest unpinned entry goes first when it is full.",
    ),
    "quartz-queue-md": (
        "Quartz job queue",
        "# Quartz job queue\n\nQuartz runs background jobs for the billing service.\n\n"
        "## Retries\n\nQuartz retries a failed job five times, with exponential backoff starting at two seconds. "
        "After the fifth failure the job moves to the dead-letter table.\n\n"
        "## Workers\n\nEach Quartz worker takes one job at a time from the queue.",
    ),
    "deploy-notes-md": (
        "Deployment notes",
        "# Deployment notes\n\nReleases go out on Tuesdays after the staging soak passes.\n\n"
        "Rollbacks use the previous container image tag, which the release job keeps for 14 days.",
    ),
}


LOCAL_PAGES = {
    "lumen-overview": (
        "Lumen overview",
        "# Lumen overview\n\nThe Lumen dashboard lives at lumen.internal/dash and shows hit rates per service.",
        ["lumen-cache-md"],
    ),
}


@pytest.fixture(scope="session")
def embedder_session(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    """Loads MiniLM once for the whole session (each test still gets its own data home)."""
    from hydrabrain.shared.config import load_settings

    return get_embedder(load_settings(home=tmp_path_factory.mktemp("crag-model-home")))


@pytest.fixture(scope="module")
def web() -> Iterator[SearchServer]:
    with SearchServer.from_folder(HERE / "web", slow_s=3.0) as server:
        yield server


@pytest.fixture
def crag_settings(settings: Settings, web: SearchServer, embedder_session: Embedder) -> Settings:
    """Settings with the local wiki indexed and web search pointed at the loopback server."""
    index_wiki(settings, get_embedder(settings), LOCAL_SOURCES, LOCAL_PAGES)
    settings.crag.web_search_url = web.url
    settings.crag.allow_private_urls = True  # the test web lives on 127.0.0.1
    settings.crag.web_timeout_s = 1.0
    web.queries.clear()
    return settings
