"""Decompose documents into strips and recompose the best of them within a token budget.

The paper's excerption mode: a document is cut into small groups of sentences, each group is
scored on its own, noise is dropped, and what survives is put back together in reading order so
the context still reads like its sources.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A sentence ends at . ! or ? followed by space and something that can start a sentence; markdown
# headings, list items and blank lines end one too.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[`*_-])")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*)$")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "Dr.", "Mr.", "Ms.", "No.", "Fig.", "cf.")


@dataclass(frozen=True)
class Strip:
    doc_index: int  # which document it came from
    position: int  # order inside that document
    text: str
    heading: str  # nearest markdown heading above it ("" when none)


def split_sentences(text: str) -> list[tuple[str, str]]:
    """(heading, sentence) pairs in reading order; headings are context, not sentences."""
    out: list[tuple[str, str]] = []
    heading = ""
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip().splitlines()
        buffer: list[str] = []

        def flush() -> None:
            if buffer:
                out.extend((heading, s) for s in _sentences(" ".join(buffer)))
                buffer.clear()

        for line in lines:
            match = _HEADING.match(line)
            if match:
                flush()
                heading = match.group(1).strip().strip("#").strip()
                continue
            if _LIST_ITEM.match(line):
                flush()
                buffer.append(_LIST_ITEM.sub("", line).strip())
                flush()
                continue
            if line.strip():
                buffer.append(line.strip())
        flush()
    return out


def _sentences(paragraph: str) -> list[str]:
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    if not paragraph:
        return []
    pieces = _SENTENCE_END.split(paragraph)
    merged: list[str] = []
    for piece in pieces:
        if merged and merged[-1].endswith(_ABBREVIATIONS):
            merged[-1] = f"{merged[-1]} {piece}"
        else:
            merged.append(piece)
    return [p.strip() for p in merged if p.strip()]


def decompose(text: str, doc_index: int = 0, sentences_per_strip: int = 2, max_words: int = 80) -> list[Strip]:
    """Strips of up to `sentences_per_strip` sentences (fewer when that would pass `max_words`).

    A strip never spans two sections, so its heading describes all of it.
    """
    strips: list[Strip] = []
    group: list[str] = []
    group_heading = ""
    words = 0

    def close() -> None:
        nonlocal words
        if group:
            strips.append(Strip(doc_index, len(strips), " ".join(group), group_heading))
            group.clear()
            words = 0

    for heading, sentence in split_sentences(text):
        n = len(sentence.split())
        if group and (heading != group_heading or len(group) >= sentences_per_strip or words + n > max_words):
            close()
        if not group:
            group_heading = heading
        group.append(sentence)
        words += n
    close()
    return strips


def windows(text: str, count_tokens: Callable[[str], int], max_tokens: int = 200) -> list[str]:
    """`text` cut at sentence ends into pieces of at most about `max_tokens` tokens.

    The encoder reads 256 word pieces at most; a long document is judged by its best window
    instead of by a truncated head.
    """
    if count_tokens(text) <= max_tokens:
        return [text]
    out: list[str] = []
    current: list[str] = []
    used = 0
    for heading, sentence in split_sentences(text):
        piece = sentence if not heading or current else f"{heading}. {sentence}"
        n = count_tokens(piece)
        if current and used + n > max_tokens:
            out.append(" ".join(current))
            current, used = [], 0
            piece = f"{heading}. {sentence}" if heading else sentence
            n = count_tokens(piece)
        current.append(piece)
        used += n
    if current:
        out.append(" ".join(current))
    return out or [text]


def select(
    strips: Sequence[Strip],
    scores: Sequence[float],
    costs: Sequence[int],
    budget: int,
    floor: float,
    relative: float = 0.0,
) -> list[int]:
    """Indexes of the strips kept: score >= floor (and >= `relative` x the best score), best first
    until the token budget is spent, returned in stable reading order (document, then position)."""
    if not strips:
        return []
    best = max(scores)
    eligible = [i for i, s in enumerate(scores) if s >= floor and s >= relative * best]
    eligible.sort(key=lambda i: (-scores[i], strips[i].doc_index, strips[i].position))
    chosen: list[int] = []
    used = 0
    for i in eligible:
        if used + costs[i] > budget:
            continue  # a smaller strip further down may still fit
        chosen.append(i)
        used += costs[i]
    chosen.sort(key=lambda i: (strips[i].doc_index, strips[i].position))
    return chosen
