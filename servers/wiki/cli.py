"""`hydrabrain wiki ...`: bulk ingest, maintenance, reindex, lint, search and ask from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".html", ".htm")


def register(subparsers: argparse._SubParsersAction) -> None:
    wiki = subparsers.add_parser("wiki", help="work with the wiki from the command line", description="Work with the wiki from the command line.")
    sub = wiki.add_subparsers(dest="wiki_command", metavar="ACTION", required=True)

    ingest = sub.add_parser("ingest", help="ingest files, folders (recursively: .md .markdown .txt .rst .html) or URLs")
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="file, folder or http(s) URL")
    ingest.add_argument("--title", help="title for the source (only with a single file or URL)")
    ingest.add_argument("--json", action="store_true", help="print the results as JSON")
    ingest.set_defaults(func=_ingest)

    maintain = sub.add_parser("maintain", help="lint and apply the safe fixes (index, backlinks, stubs, stale marks); for schedulers")
    maintain.add_argument("--json", action="store_true", help="print the result as JSON")
    maintain.set_defaults(func=_maintain)

    reindex = sub.add_parser("reindex", help="rebuild the vector, keyword and link indexes from the wiki's files")
    reindex.set_defaults(func=_reindex)

    lint = sub.add_parser("lint", help="report broken links, orphans, missing pages, uncited claims, stale pages, contradictions")
    lint.add_argument("--json", action="store_true", help="print the report as JSON")
    lint.set_defaults(func=_lint)

    search = sub.add_parser("search", help="hybrid search over pages and sources")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=8, help="number of hits (default 8)")
    search.set_defaults(func=_search)

    ask = sub.add_parser("ask", help="passages that answer a question, with citations and unknowns")
    ask.add_argument("question")
    ask.add_argument("-k", type=int, default=8, help="most passages (default 8)")
    ask.set_defaults(func=_ask)


def _open(args: argparse.Namespace):  # noqa: ANN202 - core.Wiki, imported late to keep `--help` fast
    from hydrabrain.servers.cli import settings_from
    from hydrabrain.servers.wiki.core import Wiki

    return Wiki(settings_from(args))


def expand(paths: list[str]) -> list[str]:
    """Files under the given folders (sorted), files, and URLs, in order."""
    found: list[str] = []
    for item in paths:
        if item.startswith(("http://", "https://")):
            found.append(item)
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found += [str(p.resolve()) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")]
        else:
            found.append(str(path.resolve()) if path.exists() else item)
    return found


def _ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    items = expand(args.paths)
    if args.title and len(items) != 1:
        print("hydrabrain wiki ingest: --title needs exactly one file or URL", file=sys.stderr)
        return 2
    if not items:
        print("hydrabrain wiki ingest: no files found (looked for " + ", ".join(TEXT_SUFFIXES) + ")", file=sys.stderr)
        return 1
    wiki = _open(args)
    try:
        with tqdm(total=len(items), desc="ingest", unit="doc", file=sys.stderr) as bar:
            results = wiki.ingest_many([(item, args.title) for item in items], progress=bar.update, fail_fast=False)
    finally:
        wiki.close()
    failed = [r for r in results if r.status == "failed"]
    if args.json:
        print(json.dumps([r.model_dump() for r in results], indent=2))
    else:
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        pages = {p for r in results for p in r.pages_created}
        print(f"{len(results)} sources: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {len(pages)} pages created")
        for r in results:
            for warning in r.warnings:
                print(f"  {r.source_id or r.title}: {warning}")
    return 1 if failed else 0


def _maintain(args: argparse.Namespace) -> int:
    wiki = _open(args)
    try:
        result = wiki.maintain()
    finally:
        wiki.close()
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(f"stubs created: {', '.join(result.stubs_created) or 'none'}")
    print(f"marked stale: {', '.join(result.marked_stale) or 'none'}")
    print(f"marked with uncited claims: {', '.join(result.marked_unsupported) or 'none'}")
    print(f"backlinks updated on {result.backlinks_updated} pages; index lists {result.index_pages} pages")
    print(f"{len(result.needs_writer)} items need a writer:")
    for item in result.needs_writer:
        print(f"  - {item}")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    wiki = _open(args)
    try:
        result = wiki.reindex()
    finally:
        wiki.close()
    print(f"reindexed {result.sources} sources and {result.pages} pages ({result.items} index items)")
    return 0


def _lint(args: argparse.Namespace) -> int:
    wiki = _open(args)
    try:
        report = wiki.lint()
    finally:
        wiki.close()
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    print(f"{report.pages} pages, {report.sources} sources, {report.issue_count} issues")
    for link in report.broken_links:
        print(f"  broken link: [[{link.target}]] on {link.page}")
    for slug in report.orphans:
        print(f"  orphan: {slug}")
    for missing in report.missing_pages:
        print(f"  missing page: {missing.name} (mentioned in {', '.join(missing.mentioned_in)})")
    for claim in report.uncited_claims:
        print(f"  uncited claim on {claim.page}: {claim.sentence}")
    for stale in report.stale_pages:
        print(f"  stale: {stale.page} (updated {stale.updated}; newer sources {', '.join(stale.newer_sources)})")
    for c in report.contradictions:
        values = " vs ".join(f"{v.value!r} ({', '.join(v.pages)})" for v in c.values)
        print(f"  contradiction: {c.entity} {c.attribute}: {values}" + (f"; likely current: {c.likely_current!r}" if c.likely_current else ""))
    return 0


def _search(args: argparse.Namespace) -> int:
    wiki = _open(args)
    try:
        result = wiki.search(args.query, args.k)
    finally:
        wiki.close()
    for hit in result.hits:
        print(f"{hit.score:.4f}  {hit.id}  {hit.title}\n        {hit.snippet}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    wiki = _open(args)
    try:
        result = wiki.ask(args.question, args.k)
    finally:
        wiki.close()
    print(result.note)
    for passage in result.passages:
        print(f"- {passage.citation} ({passage.relevance:.2f}) {passage.title}: {' '.join(passage.text.split())[:200]}")
    if result.unknowns:
        print(f"unknowns: {', '.join(result.unknowns)}")
    return 0
