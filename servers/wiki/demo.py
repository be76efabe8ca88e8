"""The wiki's part of `make demo`: browse, search, ask with citations and unknowns, and lint the sample corpus."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _one_line(text: str, width: int = 150) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


async def run(client: Any, say: Callable[[str], None]) -> None:
    resources = (await client.list_resources()).resources
    templates = (await client.list_resource_templates()).resource_templates
    say(f"resources: {len(resources)} listed (index, log and every page); templates: {', '.join(t.uri_template for t in templates)}")
    index = (await client.read_resource("wiki://index")).contents[0].text
    say("wiki://index starts: " + _one_line(" | ".join(index.splitlines()[:8]), 200))

    say("")
    say('search "LED-4021" (an error code: the keyword index finds what a sentence vector blurs)')
    hits = (await client.call_tool("search", {"query": "LED-4021", "k": 4})).structured_content["hits"]
    for hit in hits:
        say(f"  {hit['score']:.4f} {hit['id']:<36} {_one_line(hit['snippet'], 90)}")

    for question in (
        "What database does Ledger use?",
        "How long is the on-call rotation of Team Falcon, and who approved the on-call budget?",
        "What is the parental leave policy?",
    ):
        say("")
        say(f"ask: {question}")
        answer = (await client.call_tool("ask", {"question": question, "k": 3})).structured_content
        for passage in answer["passages"]:
            say(f"  {passage['citation']} ({passage['relevance']:.2f}) {_one_line(passage['text'], 110)}")
        say(f"  answered: {answer['answered']}; unknowns: {', '.join(answer['unknowns']) or 'none'}")
        say(f"  note: {_one_line(answer['note'], 160)}")

    say("")
    say("ask about a source that carries a prompt injection: it is flagged, never followed")
    answer = (await client.call_tool("ask", {"question": "What do the vendor notes say about the SMS providers?", "k": 2})).structured_content
    for passage in answer["passages"]:
        say(f"  {passage['citation']} flags: {', '.join(passage['injection_flags']) or 'none'}")

    say("")
    say("lint")
    report = (await client.call_tool("lint", {})).structured_content
    say(f"  {report['pages']} pages from {report['sources']} sources")
    for link in report["broken_links"]:
        say(f"  broken link [[{link['target']}]] on {link['page']}")
    say(f"  {len(report['missing_pages'])} concepts mentioned on several pages without a page, e.g. "
        + ", ".join(m["name"] for m in report["missing_pages"][:5]))
    for c in report["contradictions"]:
        values = " vs ".join(f"{v['value']!r} ({v['dated'] or 'undated'})" for v in c["values"])
        say(f"  contradiction: {c['entity']} {c['attribute']}: {_one_line(values, 110)}" + (f" -> likely current {c['likely_current']!r}" if c["likely_current"] else ""))
