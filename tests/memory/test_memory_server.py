"""The memory server through a real MCP client, in memory: every tool, the resources, and the errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client

from hydrabrain.servers.memory.server import build_server
from hydrabrain.shared.config import Settings

pytestmark = pytest.mark.anyio


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content or {}


async def fails(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} should have failed: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


async def read(client: Client, uri: str) -> Any:
    result = await client.read_resource(uri)
    return json.loads(result.contents[0].text)


async def session(client: Client, user: str = "alice", task: str | None = None) -> str:
    return (await call(client, "start_session", user=user, task=task))["session_id"]


def ci(provider: str) -> list[dict[str, str]]:
    return [{"subject": "payments service", "predicate": "CI provider", "object": provider}]


async def test_a_fact_updated_twice_is_current_only_in_its_newest_form_and_the_middle_one_is_recalled_as_of_its_time(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        await call(client, "remember", session_id=sid, text="The payments service builds on Jenkins.", kind="fact", facts=ci("Jenkins"), at="2026-01-10T09:00:00Z")
        middle = await call(client, "remember", session_id=sid, text="We moved the payments service CI to GitHub Actions.", kind="fact", facts=ci("GitHub Actions"), at="2026-03-01")
        assert [f["object"] for f in middle["invalidated"]] == ["Jenkins"]
        await call(client, "remember", session_id=sid, text="Payments CI now runs on Buildkite.", kind="fact", facts=ci("Buildkite"), at="2026-05-20")

        current = await read(client, "memory://user/alice/facts")
        assert [(f["object"], f["current"]) for f in current] == [("Buildkite", True)]

        now = await call(client, "recall", query="Which CI provider does the payments service use?", user="alice", kinds=["fact"])
        assert [i["fact"]["object"] for i in now["items"]] == ["Buildkite"]

        then = await call(client, "recall", query="Which CI provider does the payments service use?", user="alice", as_of="2026-04-15T00:00:00Z", kinds=["fact"])
        [fact] = [i["fact"] for i in then["items"]]
        assert fact["object"] == "GitHub Actions"
        assert fact["valid_from"] == "2026-03-01T00:00:00Z" and fact["valid_to"] == "2026-05-20T00:00:00Z"
        assert fact["source_memory_id"] == middle["memory_id"]


async def test_ten_similar_failed_attempts_consolidate_into_one_lesson_citing_all_ten(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client, task="make the test job pass")
        tries = [
            f"Tried pinning numpy<2 in requirements to fix the ImportError in the test job; it failed again on runner {n}." for n in range(10)
        ]
        ids = [(await call(client, "remember", session_id=sid, text=t, kind="attempt"))["memory_id"] for t in tries]
        await call(client, "remember", session_id=sid, text="The office coffee machine is broken again.", kind="observation")

        result = await call(client, "consolidate", user="alice")
        [lesson] = result["created"]
        assert lesson["support"] == 10 and sorted(lesson["evidence"]) == sorted(ids)
        assert lesson["polarity"] == "dead_end" and lesson["text"].startswith("Dead end (failed 10 times)")

        again = await call(client, "consolidate", user="alice")
        assert again["created"] == [] and again["updated"] == [], "consolidating twice changes nothing"
        episodes = (await read(client, f"memory://session/{sid}"))["episodes"]
        assert len(episodes) == 11, "raw episodes are never dropped"
        assert [x["lesson_id"] for x in await read(client, "memory://user/alice/lessons")] == [lesson["lesson_id"]]


async def test_ending_a_session_consolidates_that_session_and_grows_an_existing_lesson(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        first = await session(client)
        for n in range(2):
            await call(client, "remember", session_id=first, text=f"Raising the pytest timeout did not fix the flaky upload test; it still timed out (try {n}).", kind="attempt")
        ended = await call(client, "end_session", session_id=first)
        [lesson] = ended["lessons_created"]
        assert ended["session"]["ended_at"] and lesson["support"] == 2

        second = await session(client)
        await call(client, "remember", session_id=second, text="Raising the pytest timeout again did not fix the flaky upload test; it still timed out.", kind="attempt")
        grown = await call(client, "end_session", session_id=second)
        assert grown["lessons_created"] == []
        assert [x["support"] for x in grown["lessons_updated"]] == [3]
        assert "ended" in await fails(client, "remember", session_id=first, text="late note")


async def test_a_dead_end_met_once_in_each_of_two_sessions_becomes_a_lesson_when_the_second_ends(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        first = await session(client)
        one = await call(client, "remember", session_id=first, text="Clearing the Gradle cache did not fix the Android build error; it failed again.", kind="attempt")
        assert (await call(client, "end_session", session_id=first))["lessons_created"] == []
        second = await session(client)
        two = await call(client, "remember", session_id=second, text="Wiped the Gradle cache once more; the Android build still fails with the same error.", kind="attempt")
        [lesson] = (await call(client, "end_session", session_id=second))["lessons_created"]
        assert sorted(lesson["evidence"]) == sorted([one["memory_id"], two["memory_id"]])


async def test_recall_returns_episodes_and_lessons_with_where_and_when_they_came_from(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        await call(client, "remember", session_id=sid, text="The staging Redis listens on port 6390, not the default.", at="2026-02-02T10:00:00Z")
        await call(client, "remember", session_id=sid, text="Lunch order: two pizzas for the team.")
        got = await call(client, "recall", query="What port does the staging Redis use?", user="alice", k=3)
        top = got["items"][0]
        assert top["type"] == "episode" and "6390" in top["text"]
        assert top["session_id"] == sid and top["at"] == "2026-02-02T10:00:00Z" and top["source_memory_ids"] == [top["id"]]

        only = await call(client, "recall", query="staging Redis port", user="alice", session_id=sid, kinds=["preference"])
        assert only["items"] == []


async def test_recall_says_nothing_when_nothing_relevant_is_remembered(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        await call(client, "remember", session_id=sid, text="The staging Redis listens on port 6390.")
        got = await call(client, "recall", query="Which Kubernetes namespace hosts the Grafana dashboards?", user="alice")
        assert got["items"] == []


async def test_one_users_memories_never_reach_another_user(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        alice = await session(client, "alice")
        bob = await session(client, "bob")
        await call(client, "remember", session_id=alice, text="Alice's deploy key lives in the vault at secret/deploy/alice.", kind="fact",
                   facts=[{"subject": "deploy key", "predicate": "stored in", "object": "vault secret/deploy/alice"}])
        await call(client, "remember", session_id=bob, text="Bob prefers tabs over spaces.", kind="preference")
        for n in range(2):
            await call(client, "remember", session_id=alice, text=f"Rebuilding the docker image without cache failed to fix the deploy (try {n}).", kind="attempt")
        await call(client, "consolidate", user="alice")

        seen_by_bob = await call(client, "recall", query="Where is the deploy key stored?", user="bob", k=20)
        assert all("alice" not in i["text"].lower() and "docker" not in i["text"].lower() for i in seen_by_bob["items"])
        brief = await call(client, "briefing", task="fix the deploy key and the docker build", user="bob")
        assert "secret/deploy" not in brief["text"] and "Rebuilding" not in brief["text"] and "Dead end" not in brief["text"]
        assert await read(client, "memory://user/bob/facts") == []
        assert await read(client, "memory://user/bob/lessons") == []
        assert "no session" in await fails(client, "recall", query="deploy", user="bob", session_id=alice)
        assert "no memory" in await fails(client, "forget", user="bob", memory_id=(await call(client, "recall", query="deploy key", user="alice"))["items"][0]["source_memory_ids"][0])


async def test_briefing_puts_dead_ends_first_then_facts_and_preferences_within_the_token_budget(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        await call(client, "remember", session_id=sid, text="The migration tool targets Postgres 16.", kind="fact",
                   facts=[{"subject": "migration tool", "predicate": "targets", "object": "Postgres 16"}])
        await call(client, "remember", session_id=sid, text="I prefer small migrations, one table per change.", kind="preference")
        for n in range(3):
            await call(client, "remember", session_id=sid, text=f"Running the migration tool inside a transaction failed with a lock timeout (attempt {n}).", kind="attempt")
        await call(client, "end_session", session_id=sid)

        brief = await call(client, "briefing", task="write a new migration with the migration tool", user="alice", token_budget=400)
        text = brief["text"]
        assert brief["lessons"] == 1 and brief["facts"] >= 1 and brief["preferences"] == 1
        assert text.index("Dead end") < text.index("Postgres 16") < text.index("small migrations")
        assert brief["tokens"] <= 400

        tight = await call(client, "briefing", task="write a new migration with the migration tool", user="alice", token_budget=40)
        assert tight["tokens"] <= 40 and tight["omitted"] > 0


async def test_forget_deletes_a_memory_and_its_facts_from_every_store(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        old = await call(client, "remember", session_id=sid, text="Carol owns the billing service.", kind="fact",
                         facts=[{"subject": "billing service", "predicate": "owner", "object": "Carol"}], at="2026-01-01")
        new = await call(client, "remember", session_id=sid, text="Dave took over the billing service from Carol.", kind="fact",
                         facts=[{"subject": "billing service", "predicate": "owner", "object": "Dave"}], at="2026-02-01")
        gone = await call(client, "forget", user="alice", memory_id=new["memory_id"])
        assert gone["episodes"] == 1 and gone["facts"] == 1
        facts = await read(client, "memory://user/alice/facts")
        assert [(f["object"], f["current"]) for f in facts] == [("Carol", True)], "the older fact is current again"
        hits = await call(client, "recall", query="Who took over the billing service?", user="alice", k=10)
        assert all("Dave" not in i["text"] for i in hits["items"])
        assert old["memory_id"] in {i["id"] for i in hits["items"]}

        erased = await call(client, "forget", user="alice", subject="Carol")
        assert erased["episodes"] == 1
        assert await read(client, "memory://user/alice/facts") == []
        left = await call(client, "recall", query="billing service owner Carol", user="alice", k=10)
        assert left["items"] == []


async def test_forgotten_text_is_gone_from_the_files_on_disk_not_only_from_the_api(settings: Settings) -> None:
    import subprocess

    secret = "ZEBRAQUUX4711"
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        kept = await call(client, "remember", session_id=sid, text="Alice drinks tea at four.")
        doomed = await call(client, "remember", session_id=sid, text=f"The vault code is {secret}.", kind="fact",
                            facts=[{"subject": "vault", "predicate": "code", "object": secret}])
        await call(client, "forget", user="alice", memory_id=doomed["memory_id"])
        still = await call(client, "recall", query="tea at four", user="alice")
        assert kept["memory_id"] in {i["id"] for i in still["items"]}  # the rest of her memory is intact
    holding = subprocess.run(["grep", "-rla", secret, str(settings.home)], capture_output=True, text=True).stdout.split()
    assert holding == [], f"the forgotten text is still in {holding}"


async def test_bad_input_is_refused_with_a_clear_message_and_nothing_is_stored(settings: Settings) -> None:
    settings.memory.max_text_chars = 1000
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        assert "start_session" in await fails(client, "remember", session_id="ses_nope", text="hello")
        assert "ISO 8601" in await fails(client, "remember", session_id=sid, text="deployed", at="last tuesday")
        assert "1000" in await fails(client, "remember", session_id=sid, text="x" * 5000)
        assert "facts[1].object" in await fails(client, "remember", session_id=sid, text="two facts",
                                                facts=[{"subject": "a", "predicate": "b", "object": "c"}, {"subject": "a", "predicate": "d", "object": "  "}])
        await fails(client, "remember", session_id=sid, text="bad kind", kind="rumour")
        await fails(client, "remember", session_id=sid, text="missing field", facts=[{"subject": "a", "predicate": "b"}])
        assert "ISO 8601" in await fails(client, "recall", query="anything", user="alice", as_of="yesterday")
        assert "memory_id" in await fails(client, "forget", user="alice")
        assert "no session" in await fails(client, "end_session", session_id="ses_missing")
        assert "user" in await fails(client, "start_session", user="not a valid user!")

        record = await read(client, f"memory://session/{sid}")
        assert record["episodes"] == []
        assert await read(client, "memory://user/alice/facts") == []


async def test_a_restart_loses_nothing(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = await session(client)
        saved = await call(client, "remember", session_id=sid, text="The feature flag service caches for 90 seconds.", kind="fact",
                           facts=[{"subject": "feature flag service", "predicate": "cache ttl", "object": "90 seconds"}])
        for n in range(2):
            await call(client, "remember", session_id=sid, text=f"Clearing the flag cache by hand did not fix the stale flag bug (try {n}).", kind="attempt")
        await call(client, "end_session", session_id=sid)
    async with Client(build_server(settings)) as client:
        hits = await call(client, "recall", query="How long does the feature flag service cache?", user="alice")
        assert saved["memory_id"] in {m for i in hits["items"] for m in i["source_memory_ids"]}
        assert [f["object"] for f in await read(client, "memory://user/alice/facts")] == ["90 seconds"]
        assert len(await read(client, "memory://user/alice/lessons")) == 1
        assert (await read(client, f"memory://session/{sid}"))["ended_at"]
