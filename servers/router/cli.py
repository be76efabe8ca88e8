"""`hydrabrain router ...`: ask a model, see a routing decision, the ledger and provider health."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    router = subparsers.add_parser("router", help="the router: model routing decisions, one-off completions, spend and provider health")
    sub = router.add_subparsers(dest="router_command", metavar="ACTION", required=True)

    route = sub.add_parser("route", help="which models a task would go to, in order, and why (calls nothing)")
    route.add_argument("task", help="task type: general, reasoning, code, agent, bulk, summarise, extract, classify")
    route.add_argument("prompt", nargs="?", default="", help="the prompt (its length decides which context windows fit)")
    route.add_argument("--max-tokens", type=int, default=None)
    route.set_defaults(func=_route)

    complete = sub.add_parser("complete", help="ask a model through the routing policy and print the answer")
    complete.add_argument("prompt")
    complete.add_argument("--task", default="general")
    complete.add_argument("--max-tokens", type=int, default=None)
    complete.add_argument("--tenant", default=None)
    complete.add_argument("--json", action="store_true", help="print the whole result as JSON")
    complete.set_defaults(func=_complete)

    usage = sub.add_parser("usage", help="spend from the ledger by tenant, feature and model")
    usage.add_argument("--tenant", default=None)
    usage.add_argument("--since", default=None, help="'24h', '7d', 'today', 'month' or an ISO date")
    usage.set_defaults(func=_usage)

    providers = sub.add_parser("providers", help="configured models with their tiers, prices and key status")
    providers.set_defaults(func=_providers)


def _settings(args: argparse.Namespace):  # noqa: ANN202 - keeps the import lazy
    from hydrabrain.servers.cli import settings_from

    return settings_from(args)


def _route(args: argparse.Namespace) -> int:
    from hydrabrain.servers.router.core import plain_route, report_route
    from hydrabrain.shared.llm import llm_from_settings

    llm = llm_from_settings(_settings(args))
    report = plain_route(args.task) if llm is None else report_route(llm.route(args.task, args.prompt or None, max_tokens=args.max_tokens))
    print(report.model_dump_json(indent=2))
    return 0


def _complete(args: argparse.Namespace) -> int:
    import anyio

    from hydrabrain.servers.router.core import NO_PROVIDER
    from hydrabrain.shared.llm import LLMError, llm_from_settings

    llm = llm_from_settings(_settings(args))
    if llm is None:
        print(f"hydrabrain router: {NO_PROVIDER}", file=sys.stderr)
        return 1

    async def ask():  # noqa: ANN202
        try:
            return await llm.complete(prompt=args.prompt, task=args.task, max_tokens=args.max_tokens, tenant=args.tenant, feature="cli")
        finally:
            await llm.aclose()

    try:
        result = anyio.run(ask)
    except (LLMError, ValueError) as exc:
        print(f"hydrabrain router: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.text)
        print(f"-- {result.provider}/{result.model}, {result.input_tokens}+{result.output_tokens} tokens, ${result.cost_usd:.6f}"
              + (f", fell back past {len(result.fallbacks_tried)}" if result.fallbacks_tried else ""), file=sys.stderr)
    return 0


def _usage(args: argparse.Namespace) -> int:
    from hydrabrain.servers.router.core import RouterError, usage_report
    from hydrabrain.shared.llm import Ledger

    settings = _settings(args)
    ledger = Ledger(settings.data_dir("router") / "ledger.sqlite")
    try:
        report = usage_report(ledger, settings, tenant=args.tenant, since=args.since)
    except RouterError as exc:
        print(f"hydrabrain router: {exc}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print(f"since {report.since}: {report.calls} calls, ${report.cost_usd:.6f}, {report.cache_hits} cache hits")
    for row in report.rows:
        print(f"  {row.tenant or '-':<12} {row.feature or '-':<20} {row.provider or '-'}/{row.model or '-':<24} {row.outcome:<14} "
              f"{row.calls:>6} calls {row.input_tokens:>9}+{row.output_tokens:<9} ${row.cost_usd:.6f}")
    for b in report.budgets:
        print(f"  budget {b.period} tenant={b.tenant or '*'} feature={b.feature or '*'}: ${b.spent_usd:.4f} of ${b.limit_usd:.4f}")
    return 0


def _providers(args: argparse.Namespace) -> int:
    from hydrabrain.servers.router.core import providers_report
    from hydrabrain.shared.llm import llm_from_settings

    settings = _settings(args)
    llm = llm_from_settings(settings)
    report = providers_report(llm, settings)
    print(json.dumps(report.model_dump(), indent=2))
    return 0
