"""`hydrabrain crag calibrate` and `hydrabrain crag retrieve QUESTION`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    crag = subparsers.add_parser("crag", help="Corrective RAG: calibrate the evaluator, retrieve corrected context")
    sub = crag.add_subparsers(dest="crag_command", metavar="SUBCOMMAND")

    calibrate = sub.add_parser("calibrate", help="fit the evaluator and its thresholds on the labelled dev set")
    calibrate.add_argument("--dev-set", type=Path, help="development set JSON (default: the one shipped in the package)")
    calibrate.add_argument("--output", type=Path, help="where to write the thresholds (default: the package's thresholds.json)")
    calibrate.set_defaults(func=_calibrate)

    retrieve = sub.add_parser("retrieve", help="run the CRAG pipeline for one question and print the result")
    retrieve.add_argument("question")
    retrieve.add_argument("-k", type=int, default=5, help="documents per source (default 5)")
    retrieve.add_argument("--source", action="append", dest="sources", help="wiki, memory or qdrant:<collection> (repeatable; default wiki)")
    retrieve.add_argument("--no-web", action="store_true", help="never search the web")
    retrieve.add_argument("--budget", type=int, default=1500, help="token budget for the context (default 1500)")
    retrieve.add_argument("--json", action="store_true", help="print the full result as JSON")
    retrieve.set_defaults(func=_retrieve)
    crag.set_defaults(func=lambda args: (crag.print_help(), 2)[1])


def _calibrate(args: argparse.Namespace) -> int:
    from hydrabrain.servers.cli import settings_from
    from hydrabrain.servers.crag.calibrate import DevSet, calibrate, shipped_dev_set, write_calibration
    from hydrabrain.servers.crag.evaluator import shipped_thresholds_path
    from hydrabrain.shared.embeddings import get_embedder

    settings = settings_from(args)
    try:
        DevSet.load(args.dev_set or shipped_dev_set())  # a broken file fails before the model loads
        result = calibrate(get_embedder(settings), args.dev_set)
    except ValueError as exc:
        print(f"hydrabrain crag calibrate: {exc}", file=sys.stderr)
        return 1
    output = args.output or settings.crag.thresholds_file or shipped_thresholds_path()
    write_calibration(result, output)
    meta = result.meta
    print(f"fitted on {meta['dev_pairs']} pairs / {meta['dev_sets']} sets ({meta['dev_questions']} questions); pair AUC {meta['pair_auc']:.3f}")
    print(f"thresholds: upper {result.upper:.2f}, lower {result.lower:.2f}; set action accuracy {meta['set_action_accuracy']:.1%}, ambiguous {meta['set_ambiguous_share']:.1%}")
    print(f"wrote {output}")
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    import anyio

    from hydrabrain.servers.cli import settings_from
    from hydrabrain.servers.crag.core import Crag, build_evaluator, load_llm
    from hydrabrain.shared.embeddings import get_embedder

    settings = settings_from(args)
    llm = load_llm(settings)
    embedder = get_embedder(settings)
    try:
        crag = Crag(settings, embedder, build_evaluator(settings, embedder, llm), llm)
    except (ValueError, RuntimeError) as exc:
        print(f"hydrabrain crag retrieve: {exc}", file=sys.stderr)
        return 1
    try:
        result = anyio.run(lambda: crag.retrieve(args.question, k=args.k, sources=args.sources, allow_web=not args.no_web, token_budget=args.budget))
    except ValueError as exc:
        print(f"hydrabrain crag retrieve: {exc}", file=sys.stderr)
        return 1
    finally:
        crag.close()
    if args.json:
        print(json.dumps(result.model_dump(), indent=2))
        return 0
    print(f"action: {result.action} (confidence {result.confidence:.2f}){'  [uncertain]' if result.uncertain else ''}")
    if result.rewritten_query:
        print(f"web query: {result.rewritten_query}  (web used: {'yes' if result.web_used else 'no'})")
    if result.web_error:
        print(f"web step: {result.web_error}")
    print()
    print(result.context or "(no context: nothing retrieved was judged relevant)")
    print()
    for step in result.trace:
        print(f"  {step.step:9} {step.detail}")
    return 0
