"""Feedback that carries: what the verifier saw on a FAIL reaches the next attempt, and every attempt is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydrabrain.servers.loop.core import Loop, LoopError

WRONG = "def add(a, b):\n    return a * b\n\n\ndef mul(a, b):\n    return a * b\n"


def _failing_add(loop: Loop, repo: Path):
    return next(f for f in loop.discover(repo).findings if f.key == "tests.test_calc::test_add")


def test_a_fail_verdict_reaches_the_next_attempt_through_the_task_file_and_the_result(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_add(loop, repo)
    handoff = loop.handoff(finding.finding_id)
    task = Path(handoff.task_file)
    assert "What the verifier saw" not in task.read_text()

    Path(handoff.path, "calc.py").write_text(WRONG)
    failed = loop.verify(finding.finding_id)
    assert failed.verdict == "FAIL" and failed.attempt == 1
    # The assertion line pytest printed is what the next attempt needs: it says what came instead.
    assert "assert 6 == 5" in failed.feedback
    assert "`tests.test_calc::test_add`" in failed.feedback
    text = task.read_text()
    assert "## What the verifier saw on the last attempt (attempt 1: FAIL)" in text and "assert 6 == 5" in text
    assert "- attempt 1: calc.py +1 -1 → **FAIL**" in text
    assert "the budget allows 4 more" in text

    Path(handoff.path, "calc.py").write_text(kit.fixed)
    passed = loop.verify(finding.finding_id)
    assert passed.verdict == "PASS" and passed.attempt == 2 and passed.feedback is None


def test_every_attempt_is_its_own_commit_and_can_be_restored(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_add(loop, repo)
    worktree = Path(loop.handoff(finding.finding_id).path)
    (worktree / "calc.py").write_text(WRONG)
    loop.verify(finding.finding_id)
    (worktree / "calc.py").write_text(kit.fixed)
    passed = loop.verify(finding.finding_id)

    history = loop.attempts(finding.finding_id)
    assert [(a.number, a.verdict) for a in history.attempts] == [(1, "FAIL"), (2, "PASS")]
    first, second = history.attempts
    assert second.commit_sha == passed.result_commit
    assert kit.run_git(repo, "rev-parse", f"{passed.branch}~1").strip() == first.commit_sha
    assert kit.run_git(repo, "show", f"refs/loop/{finding.finding_id}/attempt-1:calc.py") == WRONG
    assert "assert 6 == 5" in first.feedback and second.summary == "calc.py +1 -1"


def test_scope_violations_are_fed_back_and_the_attempt_budget_closes_the_finding(make_repo, settings):
    settings.loop.max_attempts = 2
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_add(loop, repo)
    worktree = Path(loop.handoff(finding.finding_id).path)
    tests = worktree / "tests" / "test_calc.py"

    tests.write_text(tests.read_text().replace("== 5", "== -1"))
    first = loop.verify(finding.finding_id)
    assert first.attempts_left == 1
    assert "Scope violations:" in first.feedback and "tests/test_calc.py" in first.feedback
    assert "Scope violations:" in (worktree / ".loop-task.md").read_text()

    tests.write_text(tests.read_text().replace("== -1", "!= 5"))
    second = loop.verify(finding.finding_id)
    assert second.verdict == "FAIL" and second.attempts_left == 0
    assert any("gave up after 2 failed attempts" in r for r in second.reasons)
    closed = loop.store.finding(finding.finding_id)
    assert closed.status == "closed" and not worktree.exists()
    with pytest.raises(LoopError, match="closed"):
        loop.handoff(finding.finding_id)
