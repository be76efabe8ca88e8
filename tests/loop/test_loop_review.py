"""The skeptical reviewer, reached through the suite's LLM router, against a loopback chat API."""

from __future__ import annotations

import json
from pathlib import Path

from hydrabrain.servers.loop.core import Loop
from hydrabrain.shared.config import ModelPrice, ProviderConfig


def test_green_tests_are_not_enough_when_the_skeptical_reviewer_objects(make_repo, kit, chat_api, settings):
    settings.router.providers = [ProviderConfig(
        name="loopback", kind="openai", base_url=chat_api.url,
        models=[ModelPrice(name="skeptic", tasks={"code": 3})],
    )]
    settings.router.exact_cache = False
    repo = make_repo()
    loop = Loop(settings)
    finding = next(f for f in loop.discover(repo).findings if f.kind == "failing_test")
    worktree = Path(loop.handoff(finding.finding_id).path)

    special_cased = kit.buggy.replace("return a - b", "return 5 if (a, b) == (2, 3) else a - b")
    (worktree / "calc.py").write_text(special_cased)
    chat_api.replies.append(json.dumps({"verdict": "FAIL", "reasons": ["add() special-cases the test's input"]}))
    rejected = loop.verify(finding.finding_id)
    assert rejected.verdict == "FAIL"
    assert any("tests pass" in r for r in rejected.reasons)
    assert any("special-cases" in r for r in rejected.reasons)
    assert worktree.is_dir()
    prompt = chat_api.prompts[0]
    assert "assume it is broken" in prompt and "return 5 if (a, b) == (2, 3)" in prompt

    (worktree / "calc.py").write_text(kit.fixed)
    chat_api.replies.append(json.dumps({"verdict": "PASS", "reasons": ["adds for every input"]}))
    accepted = loop.verify(finding.finding_id)
    assert accepted.verdict == "PASS", accepted.reasons
    assert len(chat_api.prompts) == 2


def test_an_unreachable_reviewer_is_not_taken_for_a_yes(make_repo, kit, settings):
    settings.router.providers = [ProviderConfig(
        name="down", kind="openai", base_url="http://127.0.0.1:9/v1", timeout_s=2,
        models=[ModelPrice(name="skeptic", tasks={"code": 3})],
    )]
    settings.router.max_retries = 0
    repo = make_repo()
    loop = Loop(settings)
    finding = next(f for f in loop.discover(repo).findings if f.kind == "failing_test")
    worktree = Path(loop.handoff(finding.finding_id).path)
    (worktree / "calc.py").write_text(kit.fixed)
    result = loop.verify(finding.finding_id)
    assert result.verdict == "FAIL"
    assert any("reviewer could not be reached" in r for r in result.reasons)
