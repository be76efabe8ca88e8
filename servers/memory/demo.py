"""`make demo`: the memory server at work over stdio, on the embedded defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

USER = "demo-dev"


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {' '.join(getattr(c, 'text', '') for c in result.content)}")
    return result.structured_content or {}


async def run(client: Any, say: Callable[[str], None]) -> None:
    first = await _call(client, "start_session", user=USER, task="get the integration tests green")
    sid = first["session_id"]
    say(f"start_session -> {sid}")
    note = await _call(client, "remember", session_id=sid, kind="fact", at="2026-01-12T09:00:00Z",
                       text="The payments service builds on Jenkins.",
                       facts=[{"subject": "payments service", "predicate": "CI provider", "object": "Jenkins"}])
    say(f"remember (fact) -> {note['memory_id']}: payments service CI provider Jenkins")
    await _call(client, "remember", session_id=sid, kind="preference", text="Prefer small pull requests, one concern each.")
    for n in range(3):
        await _call(client, "remember", session_id=sid, kind="attempt",
                    text=f"Raising the pytest timeout did not fix the flaky upload test; it still timed out (try {n + 1}).")
    say("remember x3 (attempt): raising the pytest timeout did not fix the flaky upload test")
    ended = await _call(client, "end_session", session_id=sid)
    for lesson in ended["lessons_created"]:
        say(f"end_session -> new lesson: {lesson['text']} [{lesson['support']} episodes]")

    second = (await _call(client, "start_session", user=USER, task="speed up the build"))["session_id"]
    moved = await _call(client, "remember", session_id=second, kind="fact", at="2026-03-02T09:00:00Z",
                        text="We moved the payments service CI to GitHub Actions.",
                        facts=[{"subject": "payments service", "predicate": "CI provider", "object": "GitHub Actions"}])
    old = ", ".join(f"{f['object']} (valid until {f['valid_to'][:10]})" for f in moved["invalidated"])
    say(f"remember (fact) -> GitHub Actions supersedes {old}")

    now = await _call(client, "recall", query="Which CI provider does the payments service use?", user=USER, k=3)
    say("recall 'Which CI provider does the payments service use?':")
    for item in now["items"]:
        say(f"  [{item['type']}] {item['text']}  ({item['at'][:10]})")
    then = await _call(client, "recall", query="Which CI provider does the payments service use?", user=USER, k=1,
                       as_of="2026-02-01T00:00:00Z", kinds=["fact"])
    say(f"recall as_of 2026-02-01 -> {then['items'][0]['text'] if then['items'] else 'nothing'}")
    empty = await _call(client, "recall", query="Which Kubernetes namespace hosts the Grafana dashboards?", user=USER)
    say(f"recall about something never remembered -> {len(empty['items'])} items (it says so instead of guessing)")

    brief = await _call(client, "briefing", task="fix the flaky upload test in the payments service", user=USER, token_budget=200)
    say(f"briefing ({brief['tokens']} of {brief['token_budget']} tokens, MiniLM tokenizer):")
    for line in brief["text"].splitlines():
        say(f"  | {line}")

    gone = await _call(client, "forget", user=USER, memory_id=moved["memory_id"])
    facts = (await client.read_resource(f"memory://user/{USER}/facts")).contents[0].text
    say(f"forget {moved['memory_id']} -> {gone['episodes']} episode, {gone['facts']} fact deleted; current facts now: "
        + ", ".join(line.split('"object": ')[1].strip().strip(',') for line in facts.splitlines() if '"object"' in line))

    # A conversation as a chat client writes it: the turns as they were said, no facts.
    chat = (await _call(client, "start_session", user="demo-chat", task="catch-up call"))["session_id"]
    turns = [
        {"speaker": "Ana", "text": "How was your week, Ben?", "at": "2026-05-08T18:00:00Z"},
        {"speaker": "Ben", "text": "Busy! We adopted a beagle puppy named Pickle last Friday."},
        {"speaker": "Ana", "text": "Tell me everything!"},
        {"speaker": "Ben", "text": "Pickle already chewed through my hiking boots."},
        {"speaker": "Ana", "text": "I started a pottery class yesterday and made a lopsided bowl."},
    ]
    wrote = await _call(client, "remember_turns", session_id=chat, turns=turns)
    say(f"remember_turns -> {len(wrote['memory_ids'])} turns in one call, {wrote['dates_resolved']} relative dates resolved")
    for question in ("When did Ben adopt his puppy?", "What did Ana make in her pottery class?", "What did Ana's puppy chew?"):
        found = await _call(client, "recall", query=question, user="demo-chat", k=2)
        if not found["items"]:
            say(f"recall '{question}' -> nothing (the words were said by the other speaker)")
            continue
        top = found["items"][0]
        dates = f" (dates: {', '.join(top['dates'])})" if top["dates"] else ""
        say(f"recall '{question}' -> {top['speaker']}: {top['text']}{dates}")
