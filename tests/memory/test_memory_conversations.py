"""Conversation memory: turns written in batches, recalled with speaker, dates and context; superseded memory marked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcp import Client

from hydrabrain.servers.memory.core import MemoryInputError, MemoryService
from hydrabrain.servers.memory.io import import_turns
from hydrabrain.servers.memory.server import build_server
from hydrabrain.shared.config import Settings
from hydrabrain.shared.lexical import open_lexical_index

pytestmark = pytest.mark.anyio

SESSION_1 = [
    {"speaker": "Ana", "text": "Hi Ben! How was your week?"},
    {"speaker": "Ben", "text": "Long, but fine. Anything new on your side?"},
    {"speaker": "Ana", "text": "I took my first pottery class yesterday and made a lopsided bowl."},
    {"speaker": "Ben", "text": "Wow, nice. We adopted a beagle puppy named Pickle."},
    {"speaker": "Ana", "text": "That's great! Dogs are wonderful company."},
]
SESSION_2 = [
    {"speaker": "Ben", "text": "Hey Ana! Guess what Pickle did this week."},
    {"speaker": "Ana", "text": "Tell me!"},
    {"speaker": "Ben", "text": "Pickle chewed through my favourite hiking boots."},
    {"speaker": "Ana", "text": "Oh no, haha. I am applying to study marine biology at the university."},
]


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content or {}


async def write_conversation(client: Client, user: str = "ana-and-ben") -> list[str]:
    ids = []
    for at, turns in (("2023-05-08T13:56:00Z", SESSION_1), ("2023-05-25T10:00:00Z", SESSION_2)):
        sid = (await call(client, "start_session", user=user))["session_id"]
        out = await call(client, "remember_turns", session_id=sid, turns=[{**t, "at": at} for t in turns])
        ids += out["memory_ids"]
    return ids


async def test_a_batch_of_turns_is_written_in_one_call_and_recalled_with_its_speaker(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        ids = await write_conversation(client)
        assert len(ids) == len(SESSION_1) + len(SESSION_2)
        out = await call(client, "recall", query="What is Ana applying to study?", user="ana-and-ben", k=3)
    top = out["items"][0]
    assert top["id"] == ids[-1] and top["speaker"] == "Ana" and top["kind"] == "turn"


async def test_a_relative_date_is_resolved_against_the_time_of_its_turn(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        ids = await write_conversation(client)
        out = await call(client, "recall", query="When did Ana take a pottery class?", user="ana-and-ben", k=3)
    top = out["items"][0]
    assert top["id"] == ids[2]
    assert top["dates"] == ["7 May 2023"] and top["at"] == "2023-05-08T13:56:00Z"


async def test_a_question_that_needs_two_sessions_gets_the_turn_from_each(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        ids = await write_conversation(client)
        out = await call(client, "recall", query="What did Ben's beagle puppy chew?", user="ana-and-ben", k=4)
    found = [i["id"] for i in out["items"]]
    assert ids[3] in found  # session 1: the puppy is named Pickle
    assert ids[len(SESSION_1) + 2] in found  # session 2: Pickle chewed the boots


async def test_a_reply_that_shares_no_word_with_the_question_is_found_through_the_turn_it_answers(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        ids = await write_conversation(client)
        out = await call(client, "recall", query="What did Pickle do this week?", user="ana-and-ben", k=4)
    found = [i["id"] for i in out["items"]]
    assert ids[len(SESSION_1)] in found  # Ben: "Guess what Pickle did this week."
    assert ids[len(SESSION_1) + 1] in found  # Ana: "Tell me!"


async def test_a_question_about_what_the_other_speaker_did_gets_nothing(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        await write_conversation(client)
        swapped = await call(client, "recall", query="What did Ana's beagle puppy chew?", user="ana-and-ben", k=4)
        right = await call(client, "recall", query="What did Ben's beagle puppy chew?", user="ana-and-ben", k=4)
    assert swapped["items"] == []  # Ben's puppy chewed the boots; Ana never said a word about chewing
    assert right["items"] and right["items"][0]["speaker"] == "Ben"


async def test_turns_with_a_bad_field_are_refused_and_nothing_is_written(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = (await call(client, "start_session", user="ann"))["session_id"]
        good = {"speaker": "Ann", "text": "We moved to Lisbon."}
        for turns, message in (
            ([good, {"speaker": "Ann", "text": "   "}], "turns[1].text is empty"),
            ([good, {"speaker": "", "text": "Hello"}], "turns[1].speaker"),
            ([good, {"speaker": "Ann", "text": "Hi", "at": "last tuesday"}], "turns[1].at"),
            ([], "non-empty list"),
        ):
            result = await client.call_tool("remember_turns", {"session_id": sid, "turns": turns})
            assert result.is_error and message in result.content[0].text
        unknown = await client.call_tool("remember_turns", {"session_id": "ses_nope", "turns": [good]})
        assert unknown.is_error and "start_session" in unknown.content[0].text
        session = json.loads((await client.read_resource(f"memory://session/{sid}")).contents[0].text)
        assert session["episodes"] == []
        assert (await call(client, "recall", query="Where did Ann move?", user="ann"))["items"] == []


def test_a_jsonl_file_of_conversations_imports_whole_or_not_at_all(settings: Settings, tmp_path: Path) -> None:
    service = MemoryService(settings)
    try:
        lines = [json.dumps({"session": "first", "turns": [{**t, "at": "2023-05-08T13:56:00Z"} for t in SESSION_1]}),
                 json.dumps({"session": "second", "turns": SESSION_2})]
        with pytest.raises(MemoryInputError, match="line 2: turns\\[0\\].text is empty"):
            import_turns(service, "bob", [lines[0], json.dumps({"turns": [{"speaker": "Bob", "text": ""}]})])
        assert service.log.count("bob") == 0
        result = import_turns(service, "bob", lines)
        assert result.turns == len(SESSION_1) + len(SESSION_2) and len(result.session_ids) == 2
        episodes = service.log.episodes(user="bob")
        assert [e.turn for e in episodes if e.session_id == result.session_ids[1]] == [0, 1, 2, 3]
    finally:
        service.close()


def test_one_users_lexical_ranking_does_not_change_when_another_user_writes(settings: Settings) -> None:
    service = MemoryService(settings)
    try:
        mine = [{"speaker": "Ann", "text": text} for text in (
            "The staging database runs Postgres on a small server.",
            "Our database backups run every night at two.",
            "The server room is cold; the database server is loud.",
            "I prefer tea to coffee in the morning.",
        )]
        sid = service.start_session("ann").id
        service.remember_turns(sid, mine)
        where = {"user": "ann"}
        before = [(h.id, round(h.score, 9)) for h in service.lexical.search("database server backups", 10, where)]
        recall_before = [i.id for i in service.recall("database server backups", "ann", k=4)]
        other = service.start_session("zed").id
        service.remember_turns(other, [{"speaker": "Zed", "text": f"database database server note {n}"} for n in range(40)])
        after = [(h.id, round(h.score, 9)) for h in service.lexical.search("database server backups", 10, where)]
        assert before == after and len(before) == 3
        assert [i.id for i in service.recall("database server backups", "ann", k=4)] == recall_before
        assert all(h.meta["user"] == "ann" for h in service.lexical.search("database", 50, where))
    finally:
        service.close()


def test_an_index_written_before_scoping_gets_per_user_statistics_when_reopened(settings: Settings) -> None:
    plain = open_lexical_index(settings, "legacy")
    plain.add_many([("a1", "red apples and pears", {"user": "a"}), ("b1", "red red red cars", {"user": "b"})])
    plain.close()
    scoped = open_lexical_index(settings, "legacy", scope_field="user")
    try:
        assert [h.id for h in scoped.search("red", 5, {"user": "a"})] == ["a1"]
        assert scoped.document_frequency(["red"], "a") == ({"red": 1}, 1)
    finally:
        scoped.close()


async def test_a_superseded_episode_is_marked_and_ranked_below_the_current_fact_while_as_of_finds_it(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        sid = (await call(client, "start_session", user="alice"))["session_id"]
        lives = lambda city: [{"subject": "Alice", "predicate": "lives in", "object": city}]  # noqa: E731
        old = await call(client, "remember", session_id=sid, text="Alice now lives in Paris.", facts=lives("Paris"), at="2024-01-10")
        await call(client, "remember", session_id=sid, text="Alice moved to Berlin for a new job.", facts=lives("Berlin"), at="2025-02-01")
        new = await call(client, "remember", session_id=sid, text="Alice lives in Lisbon these days.", facts=lives("Lisbon"), at="2025-09-01")

        now = (await call(client, "recall", query="Where does Alice live now?", user="alice", k=8))["items"]
        paris = next(i for i in now if i["id"] == old["memory_id"])
        assert paris["superseded_by"] == new["memory_id"] and paris["current"] == ["Alice lives in Lisbon"]
        current = [n for n, i in enumerate(now) if (i["fact"] or {}).get("object") == "Lisbon" or i["id"] == new["memory_id"]]
        assert current and max(current) < now.index(paris)

        then = (await call(client, "recall", query="Where does Alice live?", user="alice", as_of="2024-06-01", k=8))["items"]
        assert then[0]["id"] == old["memory_id"] or (then[0]["fact"] or {}).get("object") == "Paris"
        assert all(i["superseded_by"] is None for i in then)
        assert "Lisbon" not in json.dumps(then)


def test_the_import_turns_command_imports_a_file_and_says_what_is_wrong_with_a_bad_one(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hydrabrain.servers.cli import main

    good = tmp_path / "chats.jsonl"
    good.write_text(json.dumps({"session": "first", "turns": [{**t, "at": "2023-05-08T13:56:00Z"} for t in SESSION_1]}) + "\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"turns": [{"speaker": "Bob"}]}) + "\n", encoding="utf-8")

    assert main(["memory", "import-turns", str(bad), "--user", "bob"]) != 0
    assert "turns[0].text is empty" in capsys.readouterr().err
    assert main(["memory", "import-turns", str(good), "--user", "bob"]) == 0
    assert f"imported {len(SESSION_1)} turns in 1 session (" in capsys.readouterr().out

    service = MemoryService(settings)
    try:
        assert service.log.count("bob") == len(SESSION_1)
        assert service.recall("What did Ana make in her pottery class?", "bob", k=1)[0].text.startswith("I took my first pottery class")
    finally:
        service.close()


def test_late_interaction_weighs_the_rare_pieces_of_a_question_most() -> None:
    from hydrabrain.servers.memory.turns import late_interaction
    from hydrabrain.shared.embeddings import TokenVectors

    axis = np.eye(4, dtype=np.float16)
    question = TokenVectors(np.array([7, 9], dtype=np.int32), axis[[0, 1]])  # piece 7 is rare, piece 9 common
    turns = {
        "rare-match": TokenVectors(np.array([7], dtype=np.int32), axis[[0]]),
        "common-match": TokenVectors(np.array([9], dtype=np.int32), axis[[1]]),
        "no-match": TokenVectors(np.array([3], dtype=np.int32), axis[[3]]),
        "no-pieces": TokenVectors(np.zeros(0, dtype=np.int32), np.zeros((0, 4), dtype=np.float16)),
    }
    scores = late_interaction(question, turns, {7: 1, 9: 40}, total=40)
    assert scores["rare-match"] > scores["common-match"] > scores["no-match"] == 0.0
    assert "no-pieces" not in scores


@pytest.mark.parametrize("encoding", ["paired", "single"])
def test_a_turns_vector_reads_the_turn_before_it_whether_that_came_in_the_same_call_or_an_earlier_one(settings: Settings, encoding: str) -> None:
    settings.memory.turn_encoding = encoding
    service = MemoryService(settings)
    try:
        whole = service.start_session("one-call").id
        whole_ids = service.remember_turns(whole, SESSION_1).memory_ids
        split = service.start_session("two-calls").id
        split_ids = service.remember_turns(split, SESSION_1[:3]).memory_ids + service.remember_turns(split, SESSION_1[3:]).memory_ids

        def scores(user: str, ids: list[str]) -> list[float]:
            hits = {h.id: h.score for h in service.retriever.dense_only("Ben's new dog", k=10, where={"user": user})}
            return [hits[i] for i in ids]

        # the fourth turn opens the second call: its vector still reads the pottery turn before it
        assert scores("one-call", whole_ids) == pytest.approx(scores("two-calls", split_ids), abs=1e-5)
        # what it read before counts: the puppy turn is nearer a question about the pottery turn than alone
        query = "Ana's first pottery class"
        stored = {h.id: h.score for h in service.retriever.dense_only(query, k=10, where={"user": "one-call"})}[whole_ids[3]]
        alone = float(service.embedder.embed([f"Ben: {SESSION_1[3]['text']}"])[0] @ service.embedder.embed_one(query))
        assert stored > alone + 0.1
    finally:
        service.close()


def test_each_turn_keeps_its_own_content_pieces_and_forgetting_it_takes_them_and_their_counts(settings: Settings) -> None:
    service = MemoryService(settings)
    try:
        sid = service.start_session("ana-and-ben").id
        ids = service.remember_turns(sid, SESSION_1).memory_ids
        pieces = service.log.turn_tokens(ids)
        tokenizer = service.embedder.tokenizer
        reply = set(tokenizer.convert_ids_to_tokens(pieces[ids[3]].ids.tolist()))
        assert {"bea", "##gle", "puppy", "adopted"} <= reply  # its own words
        assert not reply & {"pottery", "the", ",", "."}  # not the previous turn's words, no stopwords or punctuation
        assert pieces[ids[3]].vecs.shape == (len(pieces[ids[3]].ids), service.embedder.dim)

        puppy = tokenizer.convert_tokens_to_ids("puppy")
        assert service.log.piece_frequencies("ana-and-ben", [puppy]) == ({puppy: 1}, len(SESSION_1))
        assert service.log.piece_frequencies("someone-else", [puppy]) == ({}, 0)

        service.forget("ana-and-ben", memory_id=ids[3])
        assert service.log.turn_tokens([ids[3]]) == {}
        assert service.log.piece_frequencies("ana-and-ben", [puppy]) == ({}, len(SESSION_1) - 1)
        service.forget("ana-and-ben", everything=True)
        assert service.log.turn_tokens(ids) == {} and service.log.piece_frequencies("ana-and-ben", [puppy]) == ({}, 0)
    finally:
        service.close()


def test_a_recalled_turn_shows_its_late_interaction_score(settings: Settings) -> None:
    service = MemoryService(settings)
    try:
        sid = service.start_session("ana-and-ben").id
        ids = service.remember_turns(sid, SESSION_1).memory_ids
        top = service.recall("What kind of dog did Ben adopt?", "ana-and-ben", k=3)[0]
        assert top.id == ids[3] and 0.0 < top.signals["maxsim"] <= 1.0
    finally:
        service.close()


def test_a_question_naming_the_wrong_speaker_gets_a_low_maxsim_share_and_the_right_one_full(settings: Settings) -> None:
    service = MemoryService(settings)
    try:
        sid = service.start_session("ana-and-ben").id
        service.remember_turns(sid, SESSION_1 + SESSION_2)
        shares = {q: service.recall_with_support(q, "ana-and-ben", k=4)[1].late_share for q in (
            "What did Ana make in her pottery class?", "What did Ben make in his pottery class?",
            "What will Ana study at the university?", "What will Ben study at the university?", "Who will study at the university?")}
    finally:
        service.close()
    # Ana took the class and is applying to study: her turns match best, whoever the question names
    assert shares["What did Ana make in her pottery class?"] == shares["What will Ana study at the university?"] == 1.0
    assert shares["Who will study at the university?"] == 1.0  # no speaker named: nothing to compare
    assert shares["What did Ben make in his pottery class?"] < 0.8 and shares["What will Ben study at the university?"] < 0.8


async def test_abstention_on_the_other_speakers_words_can_be_turned_off_in_the_settings(isolated_home: Path, monkeypatch) -> None:
    from hydrabrain.shared.config import load_settings

    monkeypatch.setenv("HYDRABRAIN_MEMORY_SPEAKER_SHARE", "0")
    monkeypatch.setenv("HYDRABRAIN_MEMORY_LATE_SHARE", "0")
    async with Client(build_server(load_settings())) as client:
        await write_conversation(client)
        swapped = await call(client, "recall", query="What did Ana's beagle puppy chew?", user="ana-and-ben", k=4)
    assert swapped["items"]  # Ana's turns come back, best first: the caller chose answers over abstention
