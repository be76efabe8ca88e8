"""The loop runs a repository's own code, so it runs it only where allowed, without the server's
secrets, and a verify whose tests write outside the worktree fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from hydrabrain.servers.loop.core import Loop
from hydrabrain.servers.loop.server import build_server
from hydrabrain.shared import serving


@pytest.mark.anyio
async def test_over_stdio_the_current_folder_is_allowed_and_anything_else_needs_allowed_repos(make_repo, tmp_path, settings) -> None:
    inside = make_repo("inside")
    outside_home = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside_home.mkdir()
    elsewhere = make_repo("inside2")
    moved = outside_home / "repo"
    elsewhere.rename(moved)
    async with Client(build_server(settings)) as client:
        ok = await client.call_tool("discover", {"repo": str(inside)})
        assert not ok.is_error, ok.content[0].text
        refused = await client.call_tool("discover", {"repo": str(moved)})
        assert refused.is_error and "allowed_repos" in refused.content[0].text and str(moved) in refused.content[0].text
        for tool, args in [("run_once", {"repo": str(moved)}), ("schedule", {"repo": str(moved), "every_seconds": 60}),
                           ("status", {"repo": str(moved)})]:
            again = await client.call_tool(tool, args)
            assert again.is_error and "allowed_repos" in again.content[0].text, tool
    settings.loop.allowed_repos = [str(outside_home)]
    async with Client(build_server(settings)) as client:
        assert not (await client.call_tool("discover", {"repo": str(moved)})).is_error


@pytest.mark.anyio
async def test_over_http_no_repository_is_allowed_until_allowed_repos_names_it(make_repo, settings) -> None:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    repo = make_repo()
    for allowed, expect_error in ((None, True), ([str(repo)], False)):
        settings.loop.allowed_repos = allowed
        with serving.in_background(serving.http_app(serving.build("loop", settings))) as url:
            transport = streamable_http_client(f"{url}/mcp", http_client=httpx2.AsyncClient(timeout=120))
            async with Client(transport, cache=None) as client:
                result = await client.call_tool("discover", {"repo": str(repo)})
        assert result.is_error == expect_error, result.content[0].text
        if expect_error:
            assert "allowed_repos" in result.content[0].text


def test_the_repositorys_tests_run_without_the_servers_secrets(make_repo, kit, settings, monkeypatch) -> None:
    monkeypatch.setenv("HYDRABRAIN_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTEST_ADDOPTS", "-k nothing_matches_this")  # our own pytest's options must not leak either
    repo = make_repo(buggy=False)
    kit.commit_file(repo, "tests/test_env.py", "import os\n\n\ndef test_no_secret():\n    assert 'HYDRABRAIN_TEST_SECRET' not in os.environ\n",
                "a test that fails if it can see the server's secret")
    found = Loop(settings).discover(repo)
    assert not [f for f in found.findings if f.kind == "failing_test"], [f.key for f in found.findings]


def test_a_verify_whose_tests_write_into_the_main_checkout_fails(make_repo, kit, settings) -> None:
    repo = make_repo()
    # The suite's own test, once the fix makes it reachable, writes a file into the main checkout.
    kit.commit_file(repo, "tests/test_side_effect.py",
                f"from pathlib import Path\n\n\ndef test_side_effect():\n    Path({str(repo / 'planted.txt')!r}).write_text('x')\n",
                "a test with a side effect outside its worktree")
    loop = Loop(settings)
    finding = next(f for f in loop.discover(repo).findings if f.kind == "failing_test")
    (repo / "planted.txt").unlink(missing_ok=True)  # discovery ran the suite in the main checkout itself
    handoff = loop.handoff(finding.finding_id)
    Path(handoff.path, "calc.py").write_text(kit.fixed)
    verdict = loop.verify(finding.finding_id)
    assert verdict.verdict == "FAIL"
    assert any("outside the worktree" in r and "planted.txt" in r for r in verdict.reasons), verdict.reasons
