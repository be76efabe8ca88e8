"""The loop server through a real MCP client, and the `hydrabrain loop` command."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from hydrabrain.servers.cli import main
from hydrabrain.servers.loop.server import build_server

pytestmark = pytest.mark.anyio


async def _call(client: Client, tool: str, **arguments):
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def test_the_contract_tools_take_a_failing_test_from_discovery_to_a_verified_fix(make_repo, kit, settings):
    repo = make_repo()
    async with Client(build_server(settings)) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"discover", "handoff", "verify", "attempts", "close", "run_once", "optimize", "schedule", "status"}

        found = await _call(client, "discover", repo=str(repo))
        finding = next(f for f in found["findings"] if f["kind"] == "failing_test")
        handoff = await _call(client, "handoff", finding_id=finding["finding_id"])
        assert handoff["branch"] == f"loop/{finding['finding_id']}"

        failed = await _call(client, "verify", finding_id=finding["finding_id"])
        assert failed["verdict"] == "FAIL" and Path(handoff["path"]).is_dir()
        assert "assert -1 == 5" in failed["feedback"] and failed["attempts_left"] == 4
        Path(handoff["path"], "calc.py").write_text(kit.fixed)
        passed = await _call(client, "verify", finding_id=finding["finding_id"])
        assert passed["verdict"] == "PASS" and passed["result_commit"]
        tried = await _call(client, "attempts", finding_id=finding["finding_id"])
        assert [a["verdict"] for a in tried["attempts"]] == ["FAIL", "PASS"]
        assert tried["attempts"][1]["commit_sha"] == passed["result_commit"]

        page = await client.read_resource(f"loop://findings/{finding['finding_id']}")
        detail = json.loads(page.contents[0].text)
        assert detail["finding"]["status"] == "passed"
        assert [v["verdict"] for v in detail["verdicts"]] == ["PASS", "FAIL"]

        cycle = await _call(client, "run_once", repo=str(repo))
        run = json.loads((await client.read_resource(f"loop://runs/{cycle['run_id']}")).contents[0].text)
        assert run["status"] == "done" and run["steps"][0]["step"] == "discover"

        status = await _call(client, "status", repo=str(repo))
        assert status["repos"][0]["counts"]["passed"] == 1


async def test_bad_input_comes_back_as_an_error_the_caller_can_act_on(tmp_path, make_repo, settings):
    plain = tmp_path / "plain"
    plain.mkdir()
    repo = make_repo()
    async with Client(build_server(settings)) as client:
        not_repo = await client.call_tool("discover", {"repo": str(plain)})
        assert not_repo.is_error and "not a git repository" in not_repo.content[0].text
        unknown = await client.call_tool("verify", {"finding_id": "f-000000000000"})
        assert unknown.is_error and "discover" in unknown.content[0].text
        bad_cron = await client.call_tool("schedule", {"repo": str(repo), "cron": "every tuesday"})
        assert bad_cron.is_error and "cron expression" in bad_cron.content[0].text
        both = await client.call_tool("schedule", {"repo": str(repo), "every_seconds": 5, "cron": "* * * * *"})
        assert both.is_error and "not both" in both.content[0].text


async def test_a_schedule_runs_cycles_inside_the_server_until_it_is_removed(make_repo, settings):
    repo = make_repo()
    settings.loop.test_command = ["true"]
    async with Client(build_server(settings)) as client:
        made = await _call(client, "schedule", repo=str(repo), every_seconds=1)
        assert made["active"] and made["next_in_s"] == 1
        with anyio.fail_after(60):
            while True:
                runs = (await _call(client, "status", repo=str(repo)))["repos"][0]["runs"]
                if any(r["status"] == "done" for r in runs):
                    break
                await anyio.sleep(0.2)
        assert (await _call(client, "status", repo=str(repo)))["repos"][0]["schedule"]["every_seconds"] == 1
        stopped = await _call(client, "schedule", repo=str(repo))
        assert not stopped["active"]
        assert (await _call(client, "status", repo=str(repo)))["repos"][0]["schedule"] is None


async def test_a_schedule_survives_a_server_restart(make_repo, settings):
    repo = make_repo()
    async with Client(build_server(settings)) as client:
        await _call(client, "schedule", repo=str(repo), cron="0 3 * * *")
    async with Client(build_server(settings)) as client:
        schedule = (await _call(client, "status", repo=str(repo)))["repos"][0]["schedule"]
        assert schedule["cron"] == "0 3 * * *"


def test_the_command_line_runs_one_cycle_and_shows_status(make_repo, capsys):
    repo = make_repo()
    assert main(["loop", "run-once", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "awaiting work" in out
    assert main(["loop", "status"]) == 0
    assert "handed_off" in capsys.readouterr().out
    assert main(["loop", "run-once", str(repo.parent)]) == 1
    assert "not a git repository" in capsys.readouterr().err
    assert main(["loop", "attempts", "f-000000000000"]) == 1
    assert "no finding or optimisation" in capsys.readouterr().err


async def test_the_demo_shows_fail_then_pass_over_stdio(settings):
    import os
    import sys

    from mcp import StdioServerParameters

    from hydrabrain.servers.loop import demo

    lines: list[str] = []
    params = StdioServerParameters(command=sys.executable, args=["-m", "hydrabrain.servers.cli", "serve", "loop"], env=dict(os.environ))
    async with Client(params) as client:
        await demo.run(client, lines.append)
    verdicts = [line for line in lines if line.startswith("loop: verify ->")]
    assert verdicts[0] == "loop: verify -> FAIL" and verdicts[1].startswith("loop: verify -> PASS")
    assert not list((settings.home / "loop" / "worktrees").glob("*/*"))  # PASS cleaned its worktree up
