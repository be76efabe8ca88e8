"""Consolidation: attempts and outcomes that say the same thing become one lesson citing all of them.

Plain mode needs no LLM: episodes are grouped by embedding similarity (single-link over a cosine
threshold), each group's polarity is read from its wording (failed / worked), and the lesson text is
the group's most central episode, prefixed with what the group shows ("Dead end (failed 10 times)").
A group joins an existing lesson whose text is close enough, so lessons grow instead of repeating.
Raw episodes are never touched.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hydrabrain.servers.memory.episodes import Episode, Lesson

FAILED = re.compile(
    r"\b(fail(s|ed|ing|ure)?|error(s|ed)?|broke(n)?|break(s)?|crash(es|ed)?|did ?n[o']t work|does ?n[o']t work|"
    r"no luck|still (fails|broken|failing|errors?)|timed? ?out|times out|regress(ed|ion)?|revert(ed)?|dead ?end|"
    r"exception|traceback|refused|denied|unable|can ?not|can't|wrong|worse|abandon(ed)?)\b",
    re.IGNORECASE,
)
WORKED = re.compile(
    r"\b(work(s|ed)|fix(es|ed)|pass(es|ed)|succeed(s|ed)?|success(ful(ly)?)?|resolv(es|ed)|solv(es|ed)|"
    r"green|done|faster|improv(es|ed)|the (fix|solution|answer) (is|was))\b",
    re.IGNORECASE,
)


def polarity(text: str) -> str:
    """'failed', 'worked' or 'unclear', from the episode's own wording."""
    failed = len(FAILED.findall(text))
    worked = len(WORKED.findall(text))
    if failed > worked:
        return "failed"
    if worked > failed:
        return "worked"
    return "unclear"


@dataclass
class Group:
    episodes: list[Episode]
    vectors: np.ndarray  # (n, dim), rows L2-normalised

    @property
    def centroid(self) -> np.ndarray:
        c = self.vectors.mean(axis=0)
        return c / max(float(np.linalg.norm(c)), 1e-9)

    def medoid(self) -> Episode:
        sims = self.vectors @ self.vectors.T  # (n, n)
        return self.episodes[int(sims.sum(axis=1).argmax())]


def group_similar(episodes: Sequence[Episode], vectors: np.ndarray, threshold: float) -> list[Group]:
    """Single-link groups over cosine >= threshold (union-find; blocked so memory stays bounded)."""
    n = len(episodes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = 1024
    for start in range(0, n, block):
        sims = vectors[start : start + block] @ vectors.T  # (block, n)
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = find(start + r), find(c)
            if a != b:
                parent[a] = b
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return [Group([episodes[i] for i in idx], vectors[idx]) for idx in members.values()]


def describe(polarity_name: str, failed: int, worked: int, body: str) -> str:
    if polarity_name == "dead_end":
        head = f"Dead end (failed {failed} time{'s' if failed != 1 else ''})"
    elif polarity_name == "works":
        head = f"Works (succeeded {worked} time{'s' if worked != 1 else ''})"
    else:
        head = f"Mixed results ({failed} failed, {worked} worked)"
    return f"{head}: {body}"


def lesson_polarity(failed: int, worked: int) -> str:
    if failed and not worked:
        return "dead_end"
    if worked and not failed:
        return "works"
    if failed > 2 * worked:
        return "dead_end"
    if worked > 2 * failed:
        return "works"
    return "mixed"


def consolidate(
    user: str,
    team: str | None,
    episodes: Sequence[Episode],
    vectors: np.ndarray,
    lessons: Sequence[Lesson],
    lesson_vectors: np.ndarray,
    all_episodes: Callable[[Sequence[str]], list[Episode]],
    threshold: float,
    min_support: int,
    now: float,
    embed: Callable[[list[str]], np.ndarray],
) -> tuple[list[Lesson], list[Lesson]]:
    """Fold these attempt/outcome episodes into the user's lessons. Returns (created, updated)."""
    by_id = {lesson.id: lesson for lesson in lessons}
    created: list[Lesson] = []
    updated: dict[str, Lesson] = {}
    cited = {e for lesson in lessons for e in lesson.evidence}
    fresh = [(e, v) for e, v in zip(episodes, vectors, strict=True) if e.id not in cited]
    if not fresh:
        return [], []
    groups = group_similar([e for e, _ in fresh], np.stack([v for _, v in fresh]), threshold)
    for group in groups:
        target: Lesson | None = None
        if len(lessons):
            sims = lesson_vectors @ group.centroid  # (n_lessons,)
            best = int(sims.argmax())
            if float(sims[best]) >= threshold:
                target = by_id[lessons[best].id]
        if target is None and len(group.episodes) < min_support:
            continue
        if target is None:
            target = Lesson(f"les_{uuid.uuid4().hex[:12]}", user, team, "mixed", "", [], 0, 0, now, now)
            created.append(target)
            by_id[target.id] = target
        elif target.id not in {c.id for c in created}:
            updated[target.id] = target
        target.evidence = list(dict.fromkeys([*target.evidence, *(e.id for e in group.episodes)]))
    for lesson in [*created, *updated.values()]:
        evidence = all_episodes(lesson.evidence)
        rebuild(lesson, evidence, now, embed([e.text for e in evidence]))
    return created, list(updated.values())


def rebuild(lesson: Lesson, evidence: list[Episode], now: float, vectors: np.ndarray | None = None) -> None:
    """Recount a lesson from its evidence and rewrite its text from the most typical episode."""
    marks = [polarity(e.text) if e.kind != "outcome" or polarity(e.text) != "unclear" else "worked" for e in evidence]
    failed, worked = marks.count("failed"), marks.count("worked")
    lesson.evidence = [e.id for e in evidence]
    lesson.failed, lesson.worked = failed, worked
    lesson.polarity = lesson_polarity(failed, worked)
    body = _typical(evidence, vectors).text
    lesson.text = describe(lesson.polarity, failed, worked, body.strip())
    lesson.updated_at = now


def _typical(evidence: list[Episode], vectors: np.ndarray | None) -> Episode:
    if vectors is not None and len(vectors) == len(evidence):
        return Group(evidence, vectors).medoid()
    # Without vectors, the most common wording wins; ties go to the latest.
    counts: dict[str, int] = {}
    for e in evidence:
        counts[e.text] = counts.get(e.text, 0) + 1
    return max(reversed(evidence), key=lambda e: counts[e.text])
