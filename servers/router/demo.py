"""The router at work over one real MCP session: the suite behind one endpoint, then model routing."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

OWN = ("complete", "route", "usage", "providers", "mounts")


def _data(result: Any) -> Any:
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


async def run(client: Any, say: Callable[[str], None]) -> None:
    tools = (await client.list_tools()).tools
    names = [t.name for t in tools]
    by_prefix = Counter(n.split("_", 1)[0] for n in names if n not in OWN)
    say(f"router: one endpoint, {len(names)} tools: its own {', '.join(OWN)} plus "
        + (", ".join(f"{p}_* ({c})" for p, c in sorted(by_prefix.items())) or "no mounted servers"))

    mounts = _data(await client.call_tool("mounts", {}))["mounts"]
    for m in mounts:
        say(f"router: mount '{m['prefix']}' ({m['source']}) is {m['state']}, {len(m['tools'])} tools, "
            f"{m['resources']} resources, {m['templates']} templates, {m['prompts']} prompts")

    templates = (await client.list_resource_templates()).resource_templates
    if templates:
        say("router: resource templates forwarded: " + ", ".join(t.uri_template for t in templates[:6]))

    if "wiki_search" in names:
        result = await client.call_tool("wiki_search", {"query": "how does the system handle failures", "k": 3})
        if result.is_error:
            say(f"router: wiki_search through the router answered with an error: {result.content[0].text[:160]}")
        else:
            hits = _data(result)
            first = next((v for v in hits.values() if isinstance(v, list)), []) if isinstance(hits, dict) else []
            say(f"router: wiki_search through the router returned {len(first)} hits (a proxied call, same answer as calling wiki directly)")

    for task in ("reasoning", "bulk", "code"):
        decision = _data(await client.call_tool("route", {"task": task, "prompt": "Summarise the design notes in three bullets."}))
        if not decision["chain"]:
            say(f"router: route({task}) has no model to choose from: {decision['explanation'][:110]}...")
            break
        chain = " -> ".join(f"{s['provider']}/{s['model']}" for s in decision["chain"])
        say(f"router: route({task}) chain {chain}: {decision['explanation'][:200]}")

    providers = _data(await client.call_tool("providers", {}))
    if providers["configured"]:
        for p in providers["providers"]:
            say(f"router: provider {p['provider']}/{p['model']} healthy={p['healthy']} spend this month ${p['spend_month_usd']:.6f}")
        answer = await client.call_tool("complete", {
            "prompt": "In one sentence: why does a paged KV cache need compaction to free memory?",
            "task": "summarise", "max_tokens": 48, "feature": "demo",
        })
        if answer.is_error:
            say(f"router: complete() failed: {answer.content[0].text[:200]}")
        else:
            done = _data(answer)
            say(f"router: complete(task=summarise) answered by {done['provider']}/{done['model']} "
                f"in {done['latency_ms']:.0f} ms, {done['input_tokens']}+{done['output_tokens']} tokens, ${done['cost_usd']:.6f}:")
            say("    " + " ".join(str(done["text"]).split())[:300])
    else:
        say("router: plain mode, no LLM provider configured; every server still works without one")
        probe = await client.call_tool("complete", {"prompt": "hello"})
        say(f"router: complete() in plain mode says: {probe.content[0].text[:160]}")

    usage = _data(await client.call_tool("usage", {"since": "24h"}))
    say(f"router: ledger for the last 24 h: {usage['calls']} calls, ${usage['cost_usd']:.6f}, {usage['cache_hits']} cache hits")
