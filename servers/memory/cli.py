"""`hydrabrain memory ...`: import and export the reference memory server's JSONL, consolidate, recall."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _service(args: argparse.Namespace):  # noqa: ANN202 - imported lazily to keep `hydrabrain --help` fast
    from hydrabrain.servers.memory.core import MemoryService
    from hydrabrain.shared.config import load_settings

    return MemoryService(load_settings(getattr(args, "config", None)))


def _run(args: argparse.Namespace, action) -> int:  # noqa: ANN001
    from hydrabrain.servers.memory.core import MemoryInputError

    service = _service(args)
    try:
        return action(service)
    except MemoryInputError as exc:
        print(f"hydrabrain memory: {exc}", file=sys.stderr)
        return 2
    finally:
        service.close()


def _not_a_file(path: Path) -> int:
    print(f"hydrabrain memory: {path} is not a file", file=sys.stderr)
    return 2


def _import(args: argparse.Namespace) -> int:
    from hydrabrain.servers.memory.io import import_jsonl

    path = Path(args.file)
    if not path.is_file():
        return _not_a_file(path)

    def action(service) -> int:  # noqa: ANN001
        with path.open(encoding="utf-8") as fh:
            result = import_jsonl(service, args.user, fh, team=args.team, source=path.name)
        print(f"imported {result.entities} entities, {result.observations} observations, {result.relations} relations into session {result.session_id}")
        return 0

    return _run(args, action)


def _import_turns(args: argparse.Namespace) -> int:
    from hydrabrain.servers.memory.io import import_turns

    path = Path(args.file)
    if not path.is_file():
        return _not_a_file(path)

    def action(service) -> int:  # noqa: ANN001
        with path.open(encoding="utf-8") as fh:
            result = import_turns(service, args.user, fh, team=args.team)
        rate = result.turns / max(result.seconds, 1e-9)
        sessions = len(result.session_ids)
        print(f"imported {result.turns} turns in {sessions} session{'' if sessions == 1 else 's'} ({rate:.0f} turns/s)")
        return 0

    return _run(args, action)


def _export(args: argparse.Namespace) -> int:
    from hydrabrain.servers.memory.io import export_jsonl

    def action(service) -> int:  # noqa: ANN001
        text = "".join(line + "\n" for line in export_jsonl(service, args.user))
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out)
        else:
            sys.stdout.write(text)
        return 0

    return _run(args, action)


def _consolidate(args: argparse.Namespace) -> int:
    def action(service) -> int:  # noqa: ANN001
        result = service.consolidate(args.user, session_id=args.session)
        print(f"{result.episodes_considered} attempts and outcomes considered; {len(result.created)} lessons created, {len(result.updated)} updated")
        for lesson in [*result.created, *result.updated]:
            print(f"  {lesson.id}  {lesson.text}  [{lesson.support} episodes]")
        return 0

    return _run(args, action)


def _recall(args: argparse.Namespace) -> int:
    def action(service) -> int:  # noqa: ANN001
        items = service.recall(args.query, args.user, k=args.k, as_of=args.as_of)
        for item in items:
            print(json.dumps({"type": item.type, "id": item.id, "at": item.at, "score": round(item.score, 4), "text": item.text}))
        return 0

    return _run(args, action)


def register(subparsers: argparse._SubParsersAction) -> None:
    memory = subparsers.add_parser("memory", help="the memory server's data: import, export, consolidate, recall")
    sub = memory.add_subparsers(dest="memory_command", metavar="ACTION", required=True)

    imp = sub.add_parser("import", help="import a reference memory-server JSONL knowledge graph")
    imp.add_argument("file", help="the JSONL file (entities, relations, observations)")
    imp.add_argument("--user", required=True, help="whose memory receives it")
    imp.add_argument("--team", help="team the records also belong to")
    imp.set_defaults(func=_import)

    turns = sub.add_parser("import-turns", help="import conversations: JSONL, one session per line with its turns")
    turns.add_argument("file", help='JSONL: {"session": name, "turns": [{"speaker", "text", "at"?}, ...]} per line')
    turns.add_argument("--user", required=True, help="whose memory receives it")
    turns.add_argument("--team", help="team the records also belong to")
    turns.set_defaults(func=_import_turns)

    exp = sub.add_parser("export", help="export a user's knowledge graph as reference-server JSONL")
    exp.add_argument("--user", required=True)
    exp.add_argument("--out", help="write to this file (default: stdout)")
    exp.set_defaults(func=_export)

    con = sub.add_parser("consolidate", help="distil attempts and outcomes into lessons")
    con.add_argument("--user", required=True)
    con.add_argument("--session", help="only this session's episodes")
    con.set_defaults(func=_consolidate)

    rec = sub.add_parser("recall", help="recall what is remembered about a query")
    rec.add_argument("query")
    rec.add_argument("--user", required=True)
    rec.add_argument("-k", type=int, default=8)
    rec.add_argument("--as-of", help="ISO 8601 time")
    rec.set_defaults(func=_recall)
