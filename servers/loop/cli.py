"""`hydrabrain loop ...`: run a cycle, list findings, or show status from the command line."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    loop = subparsers.add_parser("loop", help="the loop: discover work in a git repo, hand it off to worktrees, verify it")
    sub = loop.add_subparsers(dest="loop_command", metavar="ACTION", required=True)

    once = sub.add_parser("run-once", help="run one cycle on REPO now (resumes an interrupted one)")
    once.add_argument("repo", help="path of the git repository")
    once.add_argument("--json", action="store_true", help="print the cycle report as JSON")
    once.set_defaults(func=_run_once)

    disc = sub.add_parser("discover", help="list the work worth doing in REPO, best first")
    disc.add_argument("repo", help="path of the git repository")
    disc.add_argument("--json", action="store_true", help="print the result as JSON")
    disc.set_defaults(func=_discover)

    opt = sub.add_parser("optimize", help="improve a benchmark metric of REPO by measured attempts (resumes an unfinished run)")
    opt.add_argument("repo", help="path of the git repository")
    opt.add_argument("target", help="a target name from [loop.targets] in the repo's hydrabrain.toml, or a target .toml file")
    opt.add_argument("--implementer", choices=["auto", "search", "agent"], default="auto",
                     help="search: built-in search over the target's parameters; agent: loop.implementer_command")
    opt.add_argument("--max-attempts", type=int, default=None, help="measure at most this many attempts now; run again to resume")
    opt.add_argument("--fresh", action="store_true", help="start over from HEAD")
    opt.add_argument("--json", action="store_true", help="print the result as JSON")
    opt.set_defaults(func=_optimize)

    tries = sub.add_parser("attempts", help="every attempt at a finding or optimisation: change, commit, verdict, measurement")
    tries.add_argument("id", help="a finding_id or optimization_id")
    tries.add_argument("--json", action="store_true", help="print the history as JSON")
    tries.set_defaults(func=_attempts)

    stat = sub.add_parser("status", help="findings, recent cycles and schedules")
    stat.add_argument("repo", nargs="?", help="limit to this repository")
    stat.add_argument("--json", action="store_true", help="print the status as JSON")
    stat.set_defaults(func=_status)


def _loop(args: argparse.Namespace):  # noqa: ANN202 - keeps the heavy import lazy
    from hydrabrain.servers.cli import settings_from
    from hydrabrain.servers.loop.core import Loop

    return Loop(settings_from(args))


def _fail(exc: Exception) -> int:
    print(f"hydrabrain loop: {exc}", file=sys.stderr)
    return 1


def _run_once(args: argparse.Namespace) -> int:
    from hydrabrain.servers.loop.core import LoopError
    from hydrabrain.servers.loop.worktrees import GitError

    try:
        report = _loop(args).run_once(args.repo)
    except (LoopError, GitError) as exc:
        return _fail(exc)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    print(f"cycle {report.run_id} on {report.repo}: {report.status}" + (" (resumed)" if report.resumed else ""))
    print(f"  {report.discovered} active findings, {len(report.plan)} worked on this cycle")
    for finding_id, outcome in report.verdicts.items():
        print(f"  {finding_id}  {outcome}")
    if report.stopped:
        print(f"  stopped early: {report.stopped}")
    print(f"  time in the repo's commands {report.command_s:.2f} s, loop overhead {report.overhead_s:.2f} s")
    return 0


def _discover(args: argparse.Namespace) -> int:
    from hydrabrain.servers.loop.core import LoopError
    from hydrabrain.servers.loop.worktrees import GitError

    try:
        result = _loop(args).discover(args.repo)
    except (LoopError, GitError) as exc:
        return _fail(exc)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    for note in result.sources:
        print(f"[{note.source}] {note.note}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for f in result.findings:
        print(f"{f.finding_id}  {f.score:5.0f}  {f.status:<10}  {f.kind:<15}  {f.title}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from hydrabrain.servers.loop.core import LoopError
    from hydrabrain.servers.loop.worktrees import GitError

    try:
        result = _loop(args).status(args.repo)
    except (LoopError, GitError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(result.model_dump(), indent=2))
        return 0
    if not result.repos:
        print("the loop has not seen any repository yet; try `hydrabrain loop run-once REPO`")
    for repo in result.repos:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(repo.counts.items())) or "no findings"
        print(f"{repo.repo}: {counts}" + ("; a cycle is running" if repo.cycle_running else ""))
        if repo.schedule:
            print(f"  scheduled: {'every %g s' % repo.schedule.every_seconds if repo.schedule.every_seconds else repo.schedule.cron}")
        for f in repo.top:
            print(f"  {f.finding_id}  {f.status:<10}  {f.title}")
        for run in repo.runs:
            print(f"  run {run.run_id}: {run.status}" + (f" — {run.error}" if run.error else ""))
        for target in repo.targets:
            print(f"  target {_target_line(target)}")
    return 0


def _target_line(t) -> str:  # noqa: ANN001 - TargetStatus, imported lazily
    best = t.best
    line = f"{t.target} ({t.optimization_id}): {t.status}, {t.attempts} attempt(s)"
    if t.baseline is not None:
        line += f"; baseline {t.metric} {t.baseline.mean:.6g} ± {t.baseline.stdev:.2g}"
    if best is not None and best.measurement is not None and best.number > 0:
        gain = f", {t.gain:+.2%} against the baseline" if t.gain is not None else ""
        line += f"; best #{best.number} {best.measurement.mean:.6g} ± {best.measurement.stdev:.2g} ({best.summary}{gain})"
    elif best is not None:
        line += "; nothing beat the baseline"
    return line + (f"; stopped: {t.stopped}" if t.stopped else "")


def _optimize(args: argparse.Namespace) -> int:
    from hydrabrain.servers.loop.core import LoopError
    from hydrabrain.servers.loop.process import CommandNotFound
    from hydrabrain.servers.loop.targets import TargetError
    from hydrabrain.servers.loop.worktrees import GitError

    try:
        result = _loop(args).optimize(args.repo, args.target, args.implementer, args.max_attempts, args.fresh)
    except (LoopError, GitError, TargetError, CommandNotFound) as exc:
        return _fail(exc)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(_target_line(result))
    print(f"  history: hydrabrain loop attempts {result.optimization_id}; best change: branch {result.branch}")
    return 0


def _attempts(args: argparse.Namespace) -> int:
    from hydrabrain.servers.loop.core import LoopError

    try:
        result = _loop(args).attempts(args.id)
    except LoopError as exc:
        return _fail(exc)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    print(f"{result.kind} {result.id}: {result.status}, {len(result.attempts)} attempt(s)")
    for a in result.attempts:
        best = "  <- best" if result.best is not None and a.number == result.best else ""
        measured = f"  {a.measurement.mean:.6g} ± {a.measurement.stdev:.2g} (n={a.measurement.n})" if a.measurement else ""
        commit = (a.commit_sha or "-")[:10]
        print(f"  #{a.number:<3} {a.verdict:<12} {commit:<10}  {a.summary}{measured}{best}")
    return 0
