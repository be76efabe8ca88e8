"""What the next attempt is told: the verifier's grounded objections and a short history of earlier tries.

An implementer that starts blind repeats its mistakes. Everything here is plain text built from what
was observed (test reports, the diff's scope, the reviewer's words, the benchmark's numbers), so the
next attempt — an agent reading the task file, or the built-in search — acts on evidence.
"""

from __future__ import annotations

import re

from .store import Attempt

FEEDBACK_HEADING = "## What the verifier saw on the last attempt"
HISTORY_HEADING = "## Earlier attempts"
LESSONS_HEADING = "## Lessons from earlier work on this repository"
# pytest's report marks the failing source line with '>' and the explanation with 'E'; the last
# 'file:line: Error' line says where it happened.
_ASSERT_LINE = re.compile(r"^(>|E)\s")
_LOCATION = re.compile(r"^\S+:\d+: \w+")


def assertion_lines(failure_text: str, limit: int = 12) -> list[str]:
    """The lines of a test failure that say what was expected and what came instead."""
    lines = failure_text.splitlines()
    picked = [line.rstrip() for line in lines if _ASSERT_LINE.match(line) or _LOCATION.match(line)]
    if not picked:
        picked = [line.rstrip() for line in lines if line.strip()][:3]
    return picked[:limit]


def verifier_feedback(number: int, failures: dict[str, str], scope: list[str], objections: list[str],
                      other_reasons: list[str]) -> str:
    """Markdown for a FAIL verdict: failing tests with their assertion lines, scope violations, objections."""
    out = [f"{FEEDBACK_HEADING} (attempt {number}: FAIL)", ""]
    if failures:
        out.append("Failing tests:")
        out.append("")
        for test_id, text in list(failures.items())[:10]:
            out.append(f"- `{test_id}`")
            lines = assertion_lines(text)
            if lines:
                out += ["", "  ```text", *[f"  {line}" for line in lines], "  ```", ""]
        if len(failures) > 10:
            out.append(f"- ... and {len(failures) - 10} more")
        out.append("")
    if scope:
        out += ["Scope violations:", "", *[f"- {p}" for p in scope], ""]
    if objections:
        out += ["The reviewer objects:", "", *[f"- {o}" for o in objections], ""]
    if not (failures or scope or objections):
        out += [*[f"- {r}" for r in other_reasons], ""]
    return "\n".join(out).rstrip() + "\n"


def history(attempts: list[Attempt], limit: int = 6) -> str:
    """The last few attempts, one line each: what changed and what it caused."""
    if not attempts:
        return ""
    shown = attempts[-limit:]
    out = [HISTORY_HEADING, ""]
    if len(attempts) > limit:
        out.append(f"({len(attempts) - limit} older attempts not shown; `attempts(id)` lists them all)")
    for a in shown:
        where = f" — commit `{a.commit_sha[:10]}`" if a.commit_sha else ""
        caused = _caused(a)
        out.append(f"- attempt {a.number}: {a.summary or 'no change'} → **{a.verdict}**{caused}{where}")
    return "\n".join(out) + "\n"


def _caused(a: Attempt) -> str:
    if a.measurement is not None:
        m = a.measurement
        text = f"; metric {m.mean:.6g} ± {m.stdev:.2g} over {m.n} runs"
        return text + (f" ({a.reasons[-1]})" if a.reasons and a.verdict != "baseline" else "")
    if a.verdict == "invalid":
        return f"; {a.reasons[0][:300]}" if a.reasons else ""
    failing = [r for r in a.reasons if r.startswith(("tests fail", "changes ", "touches ", "the originally", "reviewer", "the worktree has no"))]
    return f"; {'; '.join(failing[:2])}" if failing else ""


def lessons_section(lines: list[str]) -> str:
    if not lines:
        return ""
    return "\n".join([LESSONS_HEADING, "", *lines, ""]) + "\n"
