"""`make demo`: the CRAG server at work over stdio, on the embedded defaults (no web provider)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {' '.join(getattr(c, 'text', '') for c in result.content)}")
    return result.structured_content or {}


def _show(say: Callable[[str], None], out: dict[str, Any]) -> None:
    say(f"  action {out['action']} (confidence {out['confidence']:.2f}){', uncertain' if out['uncertain'] else ''}; {out['context_tokens']} context tokens")
    for strip in out["strips"][:3]:
        text = strip["text"] if len(strip["text"]) < 140 else strip["text"][:137] + "..."
        say(f"  [{strip['score']:.2f}] {text}  <- {strip['citation']['source']}")
    if out["web_error"]:
        say(f"  web step: {out['web_error']}")
    for step in out["trace"]:
        say(f"    {step['step']}: {step['detail']}")


async def run(client: Any, say: Callable[[str], None]) -> None:
    description = await client.read_resource("crag://evaluator")
    say(f"crag://evaluator -> {description.contents[0].text}")

    question = "How many in-flight batches does the Ledger batch writer accept per pod?"
    say(f"retrieve {question!r}")
    _show(say, await _call(client, "retrieve", question=question, token_budget=300))

    question = "What is the boiling point of liquid nitrogen?"
    say(f"retrieve {question!r}  (the wiki cannot answer; no web provider is configured)")
    _show(say, await _call(client, "retrieve", question=question, token_budget=300))

    docs = [
        "Nightly reconciliation compares Ledger with the bank statements; its window is set by reconcile_window_minutes (default 90).",
        "The on-call engineer acknowledges pages within five minutes.",
    ]
    out = await _call(client, "evaluate", question="What is the default reconciliation window of Ledger?", documents=docs)
    say(f"evaluate (2 documents) -> scores {out['scores']}, action {out['action']} (upper {out['upper_threshold']}, lower {out['lower_threshold']})")
