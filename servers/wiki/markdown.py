"""Text handling for the wiki: slugs, front matter, links, citations, sentences, chunks and terms.

Everything here is pure and deterministic, so compiling the same sources twice gives the same pages.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
LINK_RE = re.compile(r"\[\[([^\[\]\n|]{1,120})(?:\|[^\[\]\n]{0,120})?\]\]")
CITE_RE = re.compile(r"\[\^([A-Za-z0-9][A-Za-z0-9._-]{0,99})\](?!:)")
FOOTNOTE_DEF_RE = re.compile(r"^\[\^([A-Za-z0-9][A-Za-z0-9._-]{0,99})\]:", re.M)
FOOTNOTE_LINE_RE = re.compile(r"^\[\^[^\]\n]+\]:.*$", re.M)
MD_LINK_RE = re.compile(r"\[([^\]\n]{1,120})\]\(([^)\s]{1,200})\)")
BOLD_RE = re.compile(r"\*\*([^*\n]{2,60})\*\*")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(\[])")
_ABBREV = ("e.g.", "i.e.", "etc.", "vs.", "Dr.", "Mr.", "Ms.", "approx.", "No.")


class SlugError(ValueError):
    """A slug that is not a plain page name."""


def slugify(text: str, max_len: int = 60) -> str:
    """A page name made of lowercase ASCII letters, digits and hyphens."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "untitled"


def check_slug(slug: str) -> str:
    """The slug itself if it names a page inside the wiki; SlugError naming the rule otherwise."""
    if not isinstance(slug, str) or not SLUG_RE.match(slug):
        raise SlugError(
            f"invalid slug {slug!r}: use 1-80 lowercase letters, digits and hyphens, starting with a letter or digit "
            f"(no '/', '..' or absolute paths); for example {slugify(str(slug))!r}"
        )
    return slug


# --- front matter -----------------------------------------------------------------------------

FRONT_ORDER = ("title", "type", "sources", "updated", "generated", "stale", "stale_sources", "unsupported_claims", "injection_flags", "backlinks")


def render_front_matter(meta: dict[str, object]) -> str:
    """`key: <json>` lines between `---` fences: valid YAML, and parseable without a YAML library."""
    keys = [k for k in FRONT_ORDER if k in meta] + sorted(k for k in meta if k not in FRONT_ORDER)
    lines = [f"{k}: {json.dumps(meta[k], ensure_ascii=False)}" for k in keys if meta[k] is not None]
    return "---\n" + "\n".join(lines) + "\n---\n"


def split_front_matter(text: str) -> tuple[dict[str, object], str]:
    """(front matter, body). Values that are not JSON are kept as stripped strings."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---", 4)
    if end < 0:
        return {}, text
    meta: dict[str, object] = {}
    for line in text[4:end].splitlines():
        if ":" not in line or line.startswith((" ", "\t", "#")):
            continue
        key, _, raw = line.partition(":")
        raw = raw.strip()
        try:
            meta[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            meta[key.strip()] = raw.strip("'\"")
    body = text[end + 4 :]
    return meta, body.removeprefix("\n")


# --- links, citations, headings -----------------------------------------------------------------


def links(body: str) -> list[str]:
    """Slugs of `[[target]]` and `[[target|label]]` links, in order, without duplicates."""
    return list(dict.fromkeys(slugify(m.group(1)) if not SLUG_RE.match(m.group(1)) else m.group(1) for m in LINK_RE.finditer(body)))


def citations(body: str) -> list[str]:
    """Source ids cited with `[^source-id]` markers (footnote definitions excluded)."""
    return list(dict.fromkeys(CITE_RE.findall(body)))


def first_heading(text: str) -> str | None:
    match = HEADING_RE.search(text)
    return match.group(2).strip() if match else None


def strip_markup(text: str) -> str:
    """Plain text: citations, link brackets, emphasis and heading marks removed."""
    text = CITE_RE.sub("", text)
    text = FOOTNOTE_DEF_RE.sub("", text)
    text = LINK_RE.sub(lambda m: m.group(1), text)
    text = MD_LINK_RE.sub(lambda m: m.group(1), text)
    text = re.sub(r"[*_`]{1,3}", "", text)
    text = re.sub(r"^#{1,6}\s+", "", text, flags=re.M)
    return text


# --- sentences and chunks ------------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines, with code fences kept whole."""
    blocks: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                blocks.append("\n".join(current).strip())
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current).strip())
    return [b for b in blocks if b]


def sentences(text: str) -> list[str]:
    """Prose sentences of `text` (headings, fences, tables and footnote definitions skipped)."""
    out: list[str] = []
    for block in paragraphs(text):
        if block.startswith(("```", "|", "[^")) or HEADING_RE.fullmatch(block.strip()):
            continue
        lines = []
        for line in block.splitlines():
            stripped = line.strip()
            if HEADING_RE.fullmatch(stripped) or stripped.startswith("|"):
                if lines:
                    out.extend(_split_sentences(" ".join(lines)))
                    lines = []
                continue
            if re.match(r"^([-*+]|\d+[.)])\s+", stripped):
                if lines:
                    out.extend(_split_sentences(" ".join(lines)))
                    lines = []
                stripped = re.sub(r"^([-*+]|\d+[.)])\s+", "", stripped)
            lines.append(stripped)
        if lines:
            out.extend(_split_sentences(" ".join(lines)))
    return [s for s in out if s]


def _split_sentences(text: str) -> list[str]:
    protected = text
    for i, abbrev in enumerate(_ABBREV):
        protected = protected.replace(abbrev, f"\x00{i}\x00")
    parts = _SENTENCE_END.split(protected)
    restored = []
    for part in parts:
        for i, abbrev in enumerate(_ABBREV):
            part = part.replace(f"\x00{i}\x00", abbrev)
        part = part.strip()
        if part:
            restored.append(part)
    return restored


def chunk_text(text: str, max_words: int = 140) -> list[str]:
    """Paragraph-aligned chunks of about `max_words` words (MiniLM reads 256 tokens at most)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    heading = ""
    for block in paragraphs(text):
        words = len(block.split())
        is_heading = bool(HEADING_RE.fullmatch(block.strip()))
        if is_heading:
            heading = HEADING_RE.fullmatch(block.strip()).group(2)  # type: ignore[union-attr]
        if current and size + words > max_words:
            chunks.append("\n\n".join(current))
            current, size = ([f"## {heading}"] if heading and not is_heading else []), 0
        if words > max_words:
            # One oversized paragraph: cut it at sentence boundaries.
            piece: list[str] = []
            for sentence in _split_sentences(block):
                if piece and len(" ".join(piece).split()) + len(sentence.split()) > max_words:
                    current.append(" ".join(piece))
                    chunks.append("\n\n".join(current))
                    current, piece = [], []
                piece.append(sentence)
            if piece:
                current.append(" ".join(piece))
                size = len(" ".join(piece).split())
            continue
        current.append(block)
        size += words
    if current and any(not HEADING_RE.fullmatch(c.strip()) for c in current):
        chunks.append("\n\n".join(current))
    return chunks or ([text.strip()] if text.strip() else [])


def sections(body: str) -> list[tuple[str, str]]:
    """(heading, text) for each `##`-level section of a page body; the lead section has heading ''."""
    parts: list[tuple[str, str]] = []
    heading = ""
    current: list[str] = []
    for line in body.splitlines():
        match = HEADING_RE.fullmatch(line.strip())
        if match and len(match.group(1)) <= 2:
            if "\n".join(current).strip():
                parts.append((heading, "\n".join(current).strip()))
            heading, current = match.group(2).strip(), [line]
            continue
        current.append(line)
    if "\n".join(current).strip():
        parts.append((heading, "\n".join(current).strip()))
    return parts


# --- terms: entities and concepts ---------------------------------------------------------------

_NOT_ENTITY = frozenset(
    """a an the this that these those it its we our you your they their he she i if when while where what
    which who why how there here then than and or but so because after before during since until also
    however each every all any some many most more no not none both either neither other another such
    monday tuesday wednesday thursday friday saturday sunday january february march april may june july
    august september october november december note notes see step steps first second third next last
    yes true false todo faq summary overview background context example examples update updates
    one two three four five six seven eight nine ten in on at of for to from by with as is are be
    do does did use using new old only once please never always""".split()
)
_COMMON_OPENERS = frozenset(
    """add approve ask attend bring check comment declare derive get hand internal keep long make mark most
    never new open read report review roll rotate run see shadow ship small write full schema topic
    delivery production secrets tests dependencies metrics logs routes orders every each""".split()
)
_CAPWORD = r"(?:[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)*|[A-Z]{2,}[0-9]*s?|[A-Z][a-z]*[0-9]+)"
_ENTITY_RE = re.compile(rf"\b{_CAPWORD}(?:[ -](?:of |de |for )?{_CAPWORD}){{0,3}}\b")


@dataclass(frozen=True)
class Term:
    key: str  # the slug the term's page would have
    name: str  # display form
    kind: str  # "entity" (a proper name) or "concept" (a defined term)


def extract_terms(text: str) -> list[Term]:
    """Named entities (capitalised names, acronyms) and concepts (bold terms) in `text`, in order."""
    found: dict[str, Term] = {}
    plain = re.sub(r"```.*?```", " ", text, flags=re.S)
    plain = FOOTNOTE_LINE_RE.sub("", plain)
    for match in BOLD_RE.finditer(plain):
        name = match.group(1).strip().strip(".:,")
        if 2 < len(name) <= 60 and len(name.split()) <= 5:
            key = slugify(name)
            found.setdefault(key, Term(key, name, "concept"))
    prose = [s for s in sentences(strip_markup(plain))]
    # Words seen capitalised in the middle of a sentence are names; a capitalised first word may not be.
    mid_caps = {m.group(0) for s in prose for m in re.finditer(r"(?<=[\w,;] )[A-Z][\w-]*", s)}
    for sentence in prose:
        for match in _ENTITY_RE.finditer(sentence):
            if re.match(r"-\d", sentence[match.end() :]):
                continue  # an identifier such as LED-4021, not a name
            words = match.group(0).split()
            at_start = match.start() == 0 or sentence[: match.start()].rstrip().endswith(('"', "“", "(", ":"))
            if at_start:
                # A sentence may open with a verb or adjective that is capitalised only by position.
                while len(words) > 1 and words[0].lower() in _COMMON_OPENERS:
                    words = words[1:]
                if len(words) == 1 and words[0] not in mid_caps and not re.search(r"[A-Z].*[A-Z]|\d", words[0]):
                    continue
            while words and words[0].lower() in _NOT_ENTITY:
                words = words[1:]
            while words and words[-1].lower() in _NOT_ENTITY:
                words = words[:-1]
            if not words:
                continue
            name = " ".join(words)
            if len(name) < 2 or name.lower() in _NOT_ENTITY:
                continue
            key = slugify(name)
            if key not in found:
                found[key] = Term(key, name, "entity")
    return list(found.values())


def mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, flags=re.I) is not None


def snippet(text: str, terms: Iterable[str], width: int = 240) -> str:
    """About `width` characters of `text` around the first query term it contains."""
    flat = " ".join(strip_markup(text).split())
    if len(flat) <= width:
        return flat
    lower = flat.lower()
    positions = [lower.find(t) for t in terms if t and lower.find(t) >= 0]
    start = max(0, min(positions) - width // 4) if positions else 0
    piece = flat[start : start + width]
    return ("…" if start else "") + piece.strip() + ("…" if start + width < len(flat) else "")
