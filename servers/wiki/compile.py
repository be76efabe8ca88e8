"""Extractive, deterministic compiling: a source page per source and a page per entity or concept
that several sources mention. With no LLM in the loop, pages are built from the sources' own
sentences, each cited, so nothing on a page is invented; the calling agent improves them with
`write_page`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hydrabrain.servers.wiki.markdown import (
    HEADING_RE,
    LINK_RE,
    MD_LINK_RE,
    SLUG_RE,
    citations,
    extract_terms,
    links,
    mentions,
    render_front_matter,
    sentences,
    slugify,
    split_front_matter,
    strip_markup,
)
from hydrabrain.servers.wiki.store import sha256

LEAD_SENTENCES = 3
KEY_POINTS = 5
QUOTES_PER_SOURCE = 3
MAX_QUOTED_SOURCES = 12


@dataclass
class SourceInfo:
    id: str
    title: str
    origin: str
    sha256: str
    version: int
    ingested: str
    dated: str | None = None  # the date the source says it was written, when it says
    injection_flags: list[str] = field(default_factory=list)
    terms: list[list[str]] = field(default_factory=list)  # [key, name, kind]
    links: list[str] = field(default_factory=list)  # slugs the source links to

    @classmethod
    def from_meta(cls, meta: Mapping) -> SourceInfo:
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**known)

    def meta(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class PageInfo:
    slug: str
    meta: dict
    body: str
    hash: str

    @property
    def title(self) -> str:
        return str(self.meta.get("title") or self.slug)

    @property
    def type(self) -> str:
        return str(self.meta.get("type") or "note")

    @property
    def sources(self) -> list[str]:
        value = self.meta.get("sources") or []
        return [str(s) for s in value] if isinstance(value, list) else [str(value)]

    @property
    def updated(self) -> str:
        return str(self.meta.get("updated") or "")

    @property
    def generated(self) -> bool:
        return bool(self.meta.get("generated"))

    @property
    def links(self) -> list[str]:
        return links(self.body)

    @property
    def citations(self) -> list[str]:
        return citations(self.body)


def parse_page(slug: str, text: str) -> PageInfo:
    meta, body = split_front_matter(text)
    return PageInfo(slug, meta, body, sha256(text))


def render_page(meta: dict, body: str) -> str:
    return render_front_matter(meta) + "\n" + body.strip() + "\n"


# --- reading a source -------------------------------------------------------------------------

_DATE_RE = re.compile(r"^(?:date|updated|last[ _-]updated|written)\s*:\s*\"?(\d{4}-\d{2}-\d{2})", re.I | re.M)


def source_date(text: str) -> str | None:
    """The date a source declares (front matter or a `Date:`/`Updated:` line), if any."""
    match = _DATE_RE.search(text[:2000])
    return match.group(1) if match else None


def source_title(text: str, fallback: str) -> str:
    meta, body = split_front_matter(text)
    if isinstance(meta.get("title"), str) and meta["title"].strip():
        return meta["title"].strip()
    heading = next((m.group(2).strip() for m in HEADING_RE.finditer(body) if m.group(1) == "#"), None)
    if heading:
        return strip_markup(heading).strip()
    return fallback


def source_links(text: str) -> list[str]:
    """Slugs a source links to: `[[Title]]` links and relative markdown links to other documents."""
    found = [slugify(m.group(1)) for m in LINK_RE.finditer(text)]
    for match in MD_LINK_RE.finditer(text):
        target = match.group(2)
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        name = target.rsplit("/", 1)[-1].split("#", 1)[0]
        if name.endswith((".md", ".markdown", ".txt")):
            found.append(slugify(name.rsplit(".", 1)[0]))
    return list(dict.fromkeys(s for s in found if SLUG_RE.match(s)))


def source_body(text: str) -> str:
    return split_front_matter(text)[1]


# --- pages ------------------------------------------------------------------------------------


def _cite(sentence: str, source_id: str) -> str:
    """The sentence with its citation marker right after the final punctuation, footnote style."""
    sentence = " ".join(strip_markup(sentence).split())
    return f"{sentence}[^{source_id}]"


def _footnotes(sources: Iterable[SourceInfo]) -> str:
    return "\n".join(f"[^{s.id}]: {s.title} (wiki://source/{s.id})" for s in sources)


def _good_sentence(sentence: str) -> bool:
    words = sentence.split()
    return 5 <= len(words) <= 60 and not sentence.rstrip().endswith(":")


def build_source_page(source: SourceInfo, text: str, term_pages: Mapping[str, str], known_pages: set[str], updated: str) -> str:
    """The page for one source: its lead, key points, sections and links, every sentence cited."""
    body = source_body(text)
    prose = [s for s in sentences(body) if _good_sentence(strip_markup(s))]
    lead = prose[:LEAD_SENTENCES]
    term_names = {name for _, name, _ in source.terms}
    ranked = sorted(
        prose[LEAD_SENTENCES:],
        key=lambda s: -(sum(1 for n in term_names if mentions(s, n)) + (1 if re.search(r"\d", s) else 0)),
    )
    key_points = [s for s in ranked[:KEY_POINTS] if s not in lead]
    key_points.sort(key=prose.index)
    headings = [strip_markup(m.group(2)).strip() for m in HEADING_RE.finditer(body) if len(m.group(1)) >= 2]

    out = [f"# {source.title}", ""]
    shown = source.origin if "://" in source.origin or source.origin == "text" else source.origin.replace("\\", "/").rsplit("/", 1)[-1]
    out.append(f"*Source page for `{shown}`, version {source.version}" + (f", dated {source.dated}" if source.dated else "") + ".*")
    out.append("")
    if lead:
        out.append(" ".join(_cite(s, source.id) for s in lead))
        out.append("")
    if key_points:
        out += ["## Key points", ""] + [f"- {_cite(s, source.id)}" for s in key_points] + [""]
    if headings:
        out += ["## Sections", ""] + [f"- {h}" for h in headings[:20]] + [""]
    related = [f"[[{term_pages[k]}]]" for k, _, _ in source.terms if k in term_pages and term_pages[k] != source.id]
    related += [f"[[{slug}]]" for slug in source.links if slug != source.id and (slug in known_pages or slug not in term_pages.values())]
    related = list(dict.fromkeys(related))
    if related:
        out += ["## Related", ""] + [f"- {r}" for r in related] + [""]
    out += [_footnotes([source])]
    meta = {
        "title": source.title,
        "type": "source",
        "sources": [source.id],
        "updated": updated,
        "generated": True,
        "injection_flags": source.injection_flags or None,
    }
    return render_page(meta, "\n".join(out))


def build_term_page(key: str, name: str, kind: str, sources: list[tuple[SourceInfo, str]], updated: str) -> str:
    """The page for an entity or concept: what each source that mentions it says, cited.

    Quotes come from the most recently ingested sources, at most MAX_QUOTED_SOURCES of them, so a
    name that thousands of sources mention still gets a page a reader (and the embedder) can take in.
    """
    total = len(sources)
    sources = sorted(sources, key=lambda st: st[0].ingested, reverse=True)[:MAX_QUOTED_SOURCES]
    sources.sort(key=lambda st: st[0].id)
    out = [f"# {name}", "", f"*{kind.capitalize()} mentioned in {total} sources.*", "", "## What the sources say", ""]
    used: list[SourceInfo] = []
    for source, text in sources:
        quotes = [s for s in sentences(source_body(text)) if mentions(strip_markup(s), name) and _good_sentence(strip_markup(s))]
        if not quotes:
            continue
        used.append(source)
        out.append(f"From [[{source.id}]]:")
        out.append("")
        out += [f"- {_cite(q, source.id)}" for q in quotes[:QUOTES_PER_SOURCE]]
        out.append("")
    out += [_footnotes(used)]
    meta = {
        "title": name,
        "type": kind,
        "sources": [s.id for s in used],
        "updated": updated,
        "generated": True,
    }
    return render_page(meta, "\n".join(out))


def build_stub_page(name: str, mentioned_in: list[PageInfo], updated: str) -> str:
    """A stub for a concept several pages mention: where it is mentioned, for a writer to fill in."""
    out = [f"# {name}", "", "*Stub created by maintenance: several pages mention this; no page describes it yet.*", "", "## Mentioned in", ""]
    out += [f"- [[{p.slug}]]" for p in mentioned_in]
    meta = {"title": name, "type": "stub", "sources": sorted({s for p in mentioned_in for s in p.sources}), "updated": updated, "generated": True}
    return render_page(meta, "\n".join(out))


def source_terms(text: str) -> list[list[str]]:
    return [[t.key, t.name, t.kind] for t in extract_terms(source_body(text))]


def catalogue(pages: Iterable[PageInfo]) -> str:
    """index.md: every page by type, with a one-line summary."""
    groups: dict[str, list[PageInfo]] = {}
    for page in pages:
        groups.setdefault(page.type, []).append(page)
    order = ["note", "source", "entity", "concept", "stub"]
    kinds = sorted(groups, key=lambda t: (order.index(t) if t in order else len(order), t))
    total = sum(len(v) for v in groups.values())
    out = ["# Index", "", f"{total} pages.", ""]
    for kind in kinds:
        out += [f"## {kind.capitalize()} pages", ""]
        for page in sorted(groups[kind], key=lambda p: p.title.lower()):
            summary = _summary(page.body)
            out.append(f"- [[{page.slug}]] {page.title}" + (f": {summary}" if summary else ""))
        out.append("")
    return "\n".join(out)


def _summary(body: str, width: int = 110) -> str:
    for sentence in sentences(body):
        plain = " ".join(strip_markup(sentence).split())
        if plain and not plain.startswith(("Source page for", "Stub created", "From ")) and "mentioned in" not in plain:
            return plain if len(plain) <= width else plain[: width - 1].rstrip() + "…"
    return ""
