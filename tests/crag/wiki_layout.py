"""Builds a local index in the wiki's layout (the contract the CRAG server reads), without the wiki server."""

from __future__ import annotations

import re
from collections.abc import Mapping

from hydrabrain.shared.config import Settings
from hydrabrain.shared.embeddings import Embedder
from hydrabrain.shared.lexical import open_lexical_index
from hydrabrain.shared.retrieval import HybridRetriever
from hydrabrain.shared.vectors import open_vector_store


def chunk_markdown(text: str, max_words: int = 120) -> list[str]:
    """Paragraphs packed into chunks of about `max_words`; a heading starts a new chunk."""
    chunks: list[str] = []
    current: list[str] = []
    words = 0
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        n = len(para.split())
        if current and (para.startswith("#") or words + n > max_words):
            chunks.append("\n\n".join(current))
            current, words = [], 0
        current.append(para)
        words += n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def index_wiki(settings: Settings, embedder: Embedder, sources: Mapping[str, tuple[str, str]], pages: Mapping[str, tuple[str, str, list[str]]] | None = None) -> int:
    """Index raw sources {source_id: (title, markdown)} and pages {slug: (title, markdown, source ids)}."""
    vectors = open_vector_store(settings, "wiki", embedder.dim, indexed=("kind", "source_id", "slug"))
    lexical = open_lexical_index(settings, "wiki")
    retriever = HybridRetriever(embedder, vectors, lexical)
    items = []
    for source_id, (title, text) in sources.items():
        for n, chunk in enumerate(chunk_markdown(text)):
            items.append((f"chunk:{source_id}:{n}", chunk, {"kind": "chunk", "source_id": source_id, "title": title}))
    for slug, (title, text, cites) in (pages or {}).items():
        for n, chunk in enumerate(chunk_markdown(text)):
            items.append((f"page:{slug}:{n}", chunk, {"kind": "page", "slug": slug, "sources": list(cites), "title": title}))
    retriever.index(items)
    vectors.close()
    lexical.close()
    return len(items)
