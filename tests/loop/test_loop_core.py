"""The loop's domain logic on real git repositories with real failing pytest suites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydrabrain.servers.loop.core import CycleBusy, Loop, LoopError
from hydrabrain.servers.loop.worktrees import DirtyWorktree, NotARepo, WorktreeMissing


def _failing_test(result, key: str = "tests.test_calc::test_add"):
    return next(f for f in result.findings if f.kind == "failing_test" and f.key == key)


def test_a_failing_test_is_one_finding_however_many_runs_see_it(make_repo, settings):
    repo = make_repo()
    loop = Loop(settings)
    first = loop.discover(repo)
    second = loop.discover(repo)
    finding = _failing_test(second)
    assert finding.finding_id == _failing_test(first).finding_id
    assert finding.seen_count == 2
    assert [f.finding_id for f in second.findings].count(finding.finding_id) == 1
    assert finding.finding_id in first.new and finding.finding_id not in second.new
    assert finding.protected == ["tests/test_calc.py"]


def test_a_path_that_is_not_a_git_repo_is_refused_with_a_clear_message(tmp_path, settings):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(NotARepo, match="not a git repository"):
        Loop(settings).discover(plain)
    with pytest.raises(NotARepo, match="not a folder"):
        Loop(settings).run_once(tmp_path / "missing")


def test_handoff_gives_each_finding_its_own_worktree_and_repeating_it_changes_nothing(make_repo, kit, settings):
    repo = make_repo()
    kit.commit_file(repo, "notes.py", "VALUE = 1  # FIXME: read this from config\n", "add notes")
    loop = Loop(settings)
    found = loop.discover(repo)
    todo = next(f for f in found.findings if f.kind == "todo")
    test = _failing_test(found)

    a, b = loop.handoff(test.finding_id), loop.handoff(todo.finding_id)
    assert a.path != b.path and a.branch != b.branch
    assert Path(a.path, "calc.py").read_text() == kit.buggy
    assert "add(2, 3)" in Path(a.task_file).read_text()
    assert kit.run_git(Path(a.path), "status", "--porcelain") == ""  # the task file is invisible to git

    again = loop.handoff(test.finding_id)
    assert (again.path, again.branch, again.created) == (a.path, a.branch, False)
    assert loop.store.finding(test.finding_id).status == "handed_off"


def test_verify_fails_an_untouched_worktree_and_passes_a_real_fix(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    handoff = loop.handoff(finding.finding_id)

    failed = loop.verify(finding.finding_id)
    assert failed.verdict == "FAIL"
    assert any("no change" in r for r in failed.reasons)
    assert any("tests.test_calc::test_add" in r for r in failed.reasons)
    assert Path(handoff.path).is_dir()  # kept for the next attempt
    assert loop.verify(finding.finding_id).cached  # nothing changed, nothing re-run

    Path(handoff.path, "calc.py").write_text(kit.fixed)
    passed = loop.verify(finding.finding_id)
    assert passed.verdict == "PASS", passed.reasons
    assert not Path(handoff.path).exists()  # closed: worktree cleaned up
    assert kit.run_git(repo, "show", f"{passed.result_commit}:calc.py") == kit.fixed
    assert kit.run_git(repo, "rev-parse", handoff.branch).strip() == passed.result_commit
    assert (repo / "calc.py").read_text() == kit.buggy  # the main checkout is never touched
    assert [v.verdict for v in loop.store.verdicts(finding.finding_id)] == ["PASS", "FAIL"]


def test_a_fix_that_rewrites_the_failing_test_is_rejected_as_out_of_scope(make_repo, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    handoff = loop.handoff(finding.finding_id)
    test_file = Path(handoff.path, "tests", "test_calc.py")
    test_file.write_text(test_file.read_text().replace("== 5", "== -1"))

    result = loop.verify(finding.finding_id)
    assert result.verdict == "FAIL"
    assert any("must not change: tests/test_calc.py" in r for r in result.reasons)
    assert result.worktree and Path(result.worktree).is_dir()


def test_deleting_the_failing_test_is_not_a_fix(make_repo, kit, settings):
    repo = make_repo()
    settings.loop.max_changed_files = 5
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    handoff = loop.handoff(finding.finding_id)
    kit.run_git(Path(handoff.path), "rm", "-q", "tests/test_calc.py")
    Path(handoff.path, "tests").mkdir(exist_ok=True)
    Path(handoff.path, "tests", "test_other.py").write_text("def test_fine():\n    pass\n")

    result = loop.verify(finding.finding_id)
    assert result.verdict == "FAIL"
    assert any("no longer runs" in r for r in result.reasons)


def test_a_hanging_test_command_and_its_children_are_killed_at_the_budget(make_repo, tmp_path, settings):
    repo = make_repo()
    pid_file = tmp_path / "child.pid"
    # The test command forks a grandchild that would outlive a plain kill of the leader.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    settings.loop.test_command = [sys.executable, "-c", script]
    settings.loop.test_timeout_s = 4  # long enough for the grandchild to start on a busy machine
    found = Loop(settings).discover(repo)

    hang = next(f for f in found.findings if f.kind == "failing_test")
    assert hang.title == "the test command hangs"
    assert "budget" in hang.detail
    tests_note = next(s for s in found.sources if s.source == "tests")
    assert not tests_note.complete
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped by its (dead) parent is a zombie: gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_a_dirty_main_worktree_stops_handoff_and_the_cycle_says_why(make_repo, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    (repo / "calc.py").write_text("# half-done edit\n")

    with pytest.raises(DirtyWorktree, match="calc.py.*commit or stash"):
        loop.handoff(finding.finding_id)
    with pytest.raises(DirtyWorktree):
        loop.run_once(repo)
    run = loop.store.runs(str(repo))[0]
    assert run.status == "refused" and "uncommitted" in (run.error or "")


def test_a_worktree_deleted_by_hand_is_reported_and_handoff_puts_it_back_with_its_commits(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    first = loop.handoff(finding.finding_id)
    worktree = Path(first.path)
    kit.commit_file(worktree, "calc.py", kit.buggy + "# first attempt\n", "first attempt")
    subprocess.run(["rm", "-rf", str(worktree)], check=True)

    with pytest.raises(WorktreeMissing, match="deleted by hand"):
        loop.verify(finding.finding_id)
    back = loop.handoff(finding.finding_id)
    assert back.path == first.path and back.recreated
    assert "# first attempt" in (worktree / "calc.py").read_text()


def test_overlapping_cycles_on_one_repo_are_refused(make_repo, settings):
    repo = make_repo()
    loop = Loop(settings)
    with loop.lock(repo.resolve()):
        with pytest.raises(CycleBusy, match="already running"):
            Loop(settings).run_once(repo)
        assert loop.status(repo).repos[0].cycle_running


def test_a_cycle_killed_mid_way_is_resumed_by_the_next_one(make_repo, kit, tmp_path, settings):
    repo = make_repo()
    pid_file = tmp_path / "implementer.pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    env = {**os.environ, "HYDRABRAIN_LOOP_IMPLEMENTER_COMMAND": json.dumps([sys.executable, "-c", hang])}
    cycle = subprocess.Popen(
        [sys.executable, "-m", "hydrabrain.servers.cli", "loop", "run-once", str(repo)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "the implementer never started"
    cycle.kill()  # the cycle dies in the middle of its implement step
    cycle.wait()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)

    loop = Loop(settings)
    interrupted = loop.store.runs(str(repo))[0]
    assert interrupted.status == "running"
    finding_id = interrupted.plan[0]
    assert [s.step for s in loop.store.run(interrupted.run_id).steps if s.finding_id == finding_id] == ["handoff"]

    # The implementer gets its task file by substitution, reads it, and fixes the bug.
    fix = f"import sys; assert 'test_add' in open(sys.argv[1]).read(); open('calc.py', 'w').write({kit.fixed!r})"
    settings.loop.implementer_command = [sys.executable, "-c", fix, "{task_file}"]
    report = loop.run_once(repo)
    assert report.resumed and report.run_id == interrupted.run_id
    assert report.verdicts[finding_id] == "PASS"
    assert loop.store.run(report.run_id).status == "done"
    assert loop.store.finding(finding_id).status == "passed"


def test_an_implementer_that_floods_its_output_is_stopped_and_verified_as_failed(make_repo, settings):
    repo = make_repo()
    settings.loop.implementer_command = [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 4096)"]
    settings.loop.implementer_max_output_bytes = 50_000
    loop = Loop(settings)
    report = loop.run_once(repo)
    finding_id = report.plan[0]
    steps = {s.step: s for s in loop.store.run(report.run_id).steps if s.finding_id == finding_id}
    assert "output budget" in steps["implement"].detail
    assert report.verdicts[finding_id] == "FAIL"


def test_without_an_implementer_a_cycle_waits_for_work_then_verifies_it(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    first = loop.run_once(repo)
    finding_id = next(f for f in first.plan if loop.store.finding(f).kind == "failing_test")
    assert first.verdicts[finding_id] == "awaiting work"
    worktree = Path(loop.store.finding(finding_id).worktree)
    (worktree / "calc.py").write_text(kit.fixed)

    second = loop.run_once(repo)
    assert second.verdicts[finding_id] == "PASS"
    assert second.overhead_s >= 0 and second.command_s > 0
    third = loop.run_once(repo)
    # The fix waits on its branch; the same red test on main is not handed off again.
    assert finding_id not in third.plan
    assert loop.store.finding(finding_id).status == "passed"


def test_the_loop_budget_caps_the_findings_one_cycle_works_on(make_repo, kit, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    for n in range(3):
        kit.commit_file(repo, f"mod{n}.py", f"X = {n}  # TODO: item {n}\n", f"mod {n}")
    settings.loop.max_findings_per_cycle = 2
    report = Loop(settings).run_once(repo)
    assert report.discovered >= 4 and len(report.plan) == 2


def test_the_command_budget_ends_a_runaway_cycle_and_says_so(make_repo, kit, settings):
    settings.loop.test_command = ["true"]
    repo = make_repo()
    for n in range(3):
        kit.commit_file(repo, f"mod{n}.py", f"X = {n}  # TODO: item {n}\n", f"mod {n}")
    settings.loop.implementer_command = ["true"]
    settings.loop.max_commands_per_cycle = 2  # the discovery test run and one implementer run
    loop = Loop(settings)
    report = loop.run_once(repo)
    assert report.stopped and "command budget" in report.stopped
    first, *rest = report.plan
    assert report.verdicts[first].startswith("not verified")
    assert not any(f in report.verdicts for f in rest)
    assert loop.store.run(report.run_id).summary["stopped"] == report.stopped


def test_markdown_issues_become_findings_and_their_text_is_never_run(make_repo, kit, tmp_path, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    marker = tmp_path / "pwned"
    body = (
        "# add() subtracts\n\nSee `calc.py`: add(2, 3) gives -1. This is a bug.\n\n"
        f"Run `$(touch {marker})` and ; touch {marker} to reproduce.\n"
    )
    kit.commit_file(repo, "issues/001-add.md", body, "file an issue")
    kit.commit_file(repo, "issues/002-old.md", "# old one\nstatus: closed\n", "closed issue")
    loop = Loop(settings)
    found = loop.discover(repo)
    issue = next(f for f in found.findings if f.kind == "issue")
    assert issue.title == "add() subtracts"
    assert issue.scope[0] == "calc.py" and "issues/**" in issue.protected
    assert not any(f.title == "old one" for f in found.findings)
    handoff = loop.handoff(issue.finding_id)
    assert f"touch {marker}" in Path(handoff.task_file).read_text()
    assert not marker.exists()

    kit.run_git(repo, "rm", "-q", "issues/001-add.md")
    kit.run_git(repo, "commit", "-q", "-m", "resolved elsewhere")
    loop.discover(repo)
    assert loop.store.finding(issue.finding_id).status == "handed_off"  # handed-off work is never dropped silently


def test_github_issues_are_read_through_the_rest_api_with_paging(make_repo, issues_api, monkeypatch, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    issues_api.add(1, "add() is wrong", "`calc.py` subtracts instead of adding", labels=["bug"])
    issues_api.add(2, "a pull request", "not an issue", pull=True)
    issues_api.add(3, "support floats", "mul should accept floats")
    monkeypatch.setenv("GITHUB_TOKEN", issues_api.token)
    settings.loop.github_repo = "acme/calc"
    settings.loop.github_api_url = issues_api.url
    loop = Loop(settings)

    found = loop.discover(repo)
    issues = {f.key: f for f in found.findings if f.kind == "issue"}
    assert set(issues) == {"gh:acme/calc#1", "gh:acme/calc#3"}
    assert issues["gh:acme/calc#1"].score > issues["gh:acme/calc#3"].score  # labelled bug
    assert issues["gh:acme/calc#1"].source_url == "https://github.com/acme/calc/issues/1"
    assert len(issues_api.requests) == 2  # followed the Link header to page 2
    assert all(r["auth"] == f"Bearer {issues_api.token}" for r in issues_api.requests)

    issues_api.issues[2]["state"] = "closed"
    again = loop.discover(repo)
    assert issues["gh:acme/calc#3"].finding_id in again.gone


def test_a_rejected_github_token_is_reported_and_loses_no_findings(make_repo, issues_api, monkeypatch, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    issues_api.add(1, "add() is wrong", "calc.py")
    settings.loop.github_repo = "acme/calc"
    settings.loop.github_api_url = issues_api.url
    monkeypatch.setenv("GITHUB_TOKEN", issues_api.token)
    loop = Loop(settings)
    issue_id = next(f.finding_id for f in loop.discover(repo).findings if f.kind == "issue")

    monkeypatch.setenv("GITHUB_TOKEN", "expired")
    again = loop.discover(repo)
    note = next(s for s in again.sources if s.source == "github")
    assert not note.complete and "401" in note.note
    assert loop.store.finding(issue_id).status == "open"


def test_recent_commits_yield_new_todo_lines_and_untested_changes(make_repo, kit, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    kit.commit_file(repo, "parser.py", "def parse(s):\n    return s.split()  # FIXME: quoted strings\n", "parser")
    kit.commit_file(repo, "old.py", "# TODO: gone soon\n", "old")
    kit.commit_file(repo, "old.py", "DONE = True\n", "old done")
    found = Loop(settings).discover(repo)
    kinds = {(f.kind, f.key) for f in found.findings}
    assert ("todo", "parser.py:FIXME:quoted strings") in kinds
    assert not any("gone soon" in key for _, key in kinds)  # removed again: nothing to do
    assert ("untested_change", "untested:parser.py") in kinds
    assert not any(key == "untested:calc.py" for _, key in kinds)  # tests/test_calc.py covers it


def test_a_passed_finding_cannot_be_handed_off_again_and_close_removes_a_worktree(make_repo, kit, settings):
    settings.loop.test_command = ["true"]  # these tests are about other sources
    repo = make_repo()
    kit.commit_file(repo, "notes.py", "X = 1  # TODO: tidy\n", "notes")
    loop = Loop(settings)
    found = loop.discover(repo)
    todo = next(f for f in found.findings if f.kind == "todo")
    path = Path(loop.handoff(todo.finding_id).path)
    closed = loop.close(todo.finding_id, "won't fix")
    assert closed.status == "closed" and not path.exists()
    with pytest.raises(LoopError, match="closed"):
        loop.handoff(todo.finding_id)


def test_a_verdict_recorded_just_before_a_crash_is_acted_on_by_the_next_verify(make_repo, kit, monkeypatch, settings):
    import hydrabrain.servers.loop.core as core

    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    worktree = Path(loop.handoff(finding.finding_id).path)
    (worktree / "calc.py").write_text(kit.fixed)

    def die(*args, **kwargs):
        raise SystemExit("killed")

    monkeypatch.setattr(core, "remove_worktree", die)
    with pytest.raises(SystemExit):
        loop.verify(finding.finding_id)
    assert loop.store.finding(finding.finding_id).status == "handed_off"  # the verdict is stored, not yet acted on
    monkeypatch.undo()

    again = Loop(settings).verify(finding.finding_id)
    assert again.verdict == "PASS" and again.cached
    assert loop.store.finding(finding.finding_id).status == "passed" and not worktree.exists()


def test_junit_reports_from_ci_are_read_instead_of_running_the_tests(make_repo, kit, tmp_path, settings):
    repo = make_repo()
    report = (
        '<?xml version="1.0"?><testsuites><testsuite name="ci" tests="2" failures="1">'
        '<testcase classname="integration.test_api" name="test_login" file="integration/test_api.py">'
        '<failure message="502 from the auth service">stack trace</failure></testcase>'
        '<testcase classname="integration.test_api" name="test_logout"/>'
        "</testsuite></testsuites>"
    )
    kit.commit_file(repo, "reports/junit.xml", report, "ci report")
    settings.loop.junit_paths = ["reports/*.xml"]
    settings.loop.test_command = [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"]
    found = Loop(settings).discover(repo)
    tests = [f for f in found.findings if f.kind == "failing_test"]
    assert [f.key for f in tests] == ["integration.test_api::test_login"]
    assert "502 from the auth service" in tests[0].detail
    assert tests[0].protected == ["integration/test_api.py"]
    assert not (tmp_path / "ran").exists()


def test_a_repo_without_a_test_command_says_how_to_set_one_and_cannot_pass(tmp_path, kit, settings):
    repo = tmp_path / "docs-only"
    repo.mkdir()
    kit.run_git(repo, "init", "-q", "-b", "main")
    kit.commit_file(repo, "README.md", "# notes\n", "readme")
    kit.commit_file(repo, "issues/typo.md", "# fix the typo in README.md\n", "issue")
    loop = Loop(settings)
    found = loop.discover(repo)
    note = next(s for s in found.sources if s.source == "tests")
    assert not note.complete and "loop.test_command" in note.note
    issue = next(f for f in found.findings if f.kind == "issue")
    worktree = Path(loop.handoff(issue.finding_id).path)
    (worktree / "README.md").write_text("# Notes\n")
    result = loop.verify(issue.finding_id)
    assert result.verdict == "FAIL"
    assert any("no test command" in r for r in result.reasons)


def test_a_merged_fix_that_regresses_reopens_its_finding(make_repo, kit, settings):
    repo = make_repo()
    loop = Loop(settings)
    finding = _failing_test(loop.discover(repo))
    worktree = Path(loop.handoff(finding.finding_id).path)
    (worktree / "calc.py").write_text(kit.fixed)
    passed = loop.verify(finding.finding_id)
    kit.run_git(repo, "merge", "-q", "--ff-only", passed.branch)
    assert not any(f.finding_id == finding.finding_id for f in loop.discover(repo).findings)

    kit.commit_file(repo, "calc.py", kit.buggy, "an unlucky refactor")
    again = loop.discover(repo)
    reopened = loop.store.finding(finding.finding_id)
    assert finding.finding_id in again.new
    assert reopened.status == "open" and reopened.closed_reason == "regressed" and reopened.result_commit is None
    fresh = loop.handoff(finding.finding_id)
    assert fresh.base_commit == kit.run_git(repo, "rev-parse", "HEAD").strip()
