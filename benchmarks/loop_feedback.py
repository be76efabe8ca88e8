"""Loop feedback benchmark: does carrying the verifier's words into the next attempt help, and does tuning find anything?

1. **Feedback** — a small real repo made here: `total(prices, discount)` with a failing test and a
   planted second bug that only shows once the first is fixed. A scripted implementer acts only on
   what the task file tells it: a patch whose symptom (an assertion line) it reads there, else a blind
   guess from its catalogue (the right patch among decoys, in a seeded random order). Run through the
   real loop (`run_once` cycles: discover, hand off, implement, verify) with the feedback sections of
   the task file read, and with them ignored; attempts to PASS are counted, over several seeds.
2. **Tuning** — the built-in search implementer tunes the wiki's hybrid fusion weights (dense, lexical,
   graph, coverage) against MRR@5 on the repo's sample corpus, on a clone of this repository's HEAD.
   The default weights are attempt 0; every attempt is benchmarked with repeats.

    nice python benchmarks/loop_feedback.py [--seeds 10] [--skip-tuning]

Prints tables and writes benchmarks/results/loop_feedback.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loop_feedback.json"
IDENTITY = ["-c", "user.name=loop benchmark", "-c", "user.email=bench@hydrabrain.invalid"]

# --- 1. the two-bug repo --------------------------------------------------------------------------

PRICES = '''def total(prices, discount):
    """Sum of the prices after a percentage discount, rounded to cents."""
    subtotal = sum(prices[1:])
    return round(subtotal - discount, 2)
'''
TESTS = '''from prices import total


def test_total():
    assert total([10.0, 20.0], 0) == 30.0
    assert total([200.0], 25) == 150.0
'''
# The implementer's catalogue: (name, symptom it responds to, text it replaces, replacement). The first
# test failure shows only bug 1; the second assertion, and so bug 2, shows only after bug 1 is fixed.
CATALOGUE = [
    ("fix-sum", "assert 20.0 == 30.0", "sum(prices[1:])", "sum(prices)"),
    ("fix-discount", "assert 175.0 == 150.0", "round(subtotal - discount, 2)", "round(subtotal * (100 - discount) / 100, 2)"),
    ("decoy-float", "could not convert", "subtotal = sum", "subtotal = 0.0 + sum"),
    ("decoy-doc", "docstring", '"""Sum of the prices', '"""Total of the prices'),
    ("decoy-name", "NameError", "def total(prices, discount):", "def total(prices, discount=0):"),
    ("decoy-list", "TypeError", "(prices[1:])", "(list(prices)[1:])"),
]
FEEDBACK_STARTS = ("Attempts so far:", "## What the verifier saw", "## Earlier attempts")


def implement(task_file: Path, seed: int, read_feedback: bool) -> str:
    """The scripted implementer: one patch per attempt, chosen only from what the task file says."""
    text = task_file.read_text(encoding="utf-8")
    if not read_feedback:
        visible = []
        for line in text.splitlines():
            if line.startswith(FEEDBACK_STARTS):
                break
            visible.append(line)
        text = "\n".join(visible)
    source = Path("prices.py")
    code = source.read_text(encoding="utf-8")
    applicable = [p for p in CATALOGUE if p[2] in code]
    for name, symptom, old, new in applicable:
        if symptom in text:
            source.write_text(code.replace(old, new, 1), encoding="utf-8")
            return f"acted on the symptom: {name}"
    # Nothing in the task file it has not already acted on: a blind guess, in this seed's order.
    order = list(applicable)
    random.Random(seed).shuffle(order)
    if not order:
        return "nothing left to try"
    name, _, old, new = order[0]
    source.write_text(code.replace(old, new, 1), encoding="utf-8")
    return f"blind guess: {name}"


def make_two_bug_repo(folder: Path) -> Path:
    repo = folder / "prices-repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    (repo / "prices.py").write_text(PRICES)
    (repo / "tests" / "test_prices.py").write_text(TESTS)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", *IDENTITY, "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", *IDENTITY, "commit", "-q", "-m", "prices"], cwd=repo, check=True)
    return repo


def feedback_run(seed: int, read_feedback: bool, max_attempts: int) -> dict:
    from hydrabrain.servers.loop.core import Loop
    from hydrabrain.shared.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_two_bug_repo(Path(tmp))
        command = [sys.executable, str(Path(__file__).resolve()), "implement", "{task_file}", "--seed", str(seed)]
        if not read_feedback:
            command.append("--ignore-feedback")
        settings = load_settings(home=Path(tmp) / "home", loop={
            "implementer_command": command, "max_attempts": max_attempts, "memory": "off", "commit_scan_depth": 0,
        })
        loop = Loop(settings)
        started = time.monotonic()
        finding_id, verdict = None, None
        for _ in range(max_attempts + 1):
            report = loop.run_once(repo)
            finding_id = finding_id or next(f for f in report.plan if loop.store.finding(f).kind == "failing_test")
            verdict = report.verdicts.get(finding_id)
            if verdict == "PASS" or loop.store.finding(finding_id).status == "closed":
                break
        tried = loop.store.attempts(finding_id)
        return {"seed": seed, "feedback": read_feedback, "passed": verdict == "PASS", "attempts": len(tried),
                "history": [a.summary for a in tried], "seconds": round(time.monotonic() - started, 2)}


def feedback_experiment(seeds: int, max_attempts: int) -> dict:
    rows = []
    for seed in range(seeds):
        for read in (True, False):
            row = feedback_run(seed, read, max_attempts)
            rows.append(row)
            print(f"  seed {seed} {'with' if read else 'without'} feedback: {'PASS' if row['passed'] else 'no PASS'} "
                  f"after {row['attempts']} attempt(s)", flush=True)

    def summary(read: bool) -> dict:
        mine = [r for r in rows if r["feedback"] == read]
        passed = [r["attempts"] for r in mine if r["passed"]]
        return {"runs": len(mine), "passed": len(passed), "mean_attempts_to_pass": statistics.fmean(passed) if passed else None,
                "median_attempts_to_pass": statistics.median(passed) if passed else None,
                "max_attempts_to_pass": max(passed) if passed else None}

    return {"max_attempts": max_attempts, "catalogue": [c[0] for c in CATALOGUE],
            "with_feedback": summary(True), "without_feedback": summary(False), "runs": rows}


# --- 2. tuning the wiki's fusion weights ----------------------------------------------------------

PARAMS_FILE = "tuning/wiki_fusion.toml"
DEFAULTS = "# Hybrid retrieval fusion weights of the wiki (shared.retrieval.RetrievalWeights)\n[fusion]\ndense = 1.0\nlexical = 1.0\ngraph = 0.5\ncoverage = 0.012\n"
SPACE = {"fusion.dense": [0.5, 1.0, 1.5, 2.0], "fusion.lexical": [0.5, 1.0, 1.5, 2.0],
         "fusion.graph": [0.0, 0.25, 0.5, 1.0], "fusion.coverage": [0.0, 0.006, 0.012, 0.024, 0.048]}


def measure_wiki(params_file: Path, home: Path, check_only: bool) -> int:
    """The tuning target's benchmark: MRR@5 and recall@5 of wiki search with the weights in `params_file`."""
    import tomllib

    from hydrabrain.shared.retrieval import RetrievalWeights

    weights = tomllib.loads(params_file.read_text(encoding="utf-8"))["fusion"]
    if any(not isinstance(v, int | float) or v < 0 for v in weights.values()):
        print(f"invalid weights: {weights}", file=sys.stderr)
        return 1
    chosen = RetrievalWeights(**weights)
    if check_only:
        print(f"weights ok: {chosen}")
        return 0
    from hydrabrain.servers.wiki.core import Wiki
    from hydrabrain.shared.config import load_settings

    corpus = ROOT / "examples" / "corpus"
    settings = load_settings(home=home, wiki={"allowed_roots": [str(corpus)]})
    wiki = Wiki(settings)
    marker = home / "ingested"
    if not marker.exists():  # the first run builds the wiki; later runs search the same one
        wiki.ingest_many([(str(p), None) for p in sorted(corpus.glob("*.md"))])
        marker.touch()
    wiki.retriever.weights = chosen
    questions = json.loads((ROOT / "examples" / "corpus_questions.json").read_text())["questions"]
    reciprocal, recall, latency = [], [], []
    for item in questions:
        started = time.perf_counter()
        hits = wiki.retriever.search(item["question"], 5)
        latency.append(time.perf_counter() - started)
        ranked: list[str] = []
        for h in hits:
            names = [str(h.payload.get("source_id"))] if h.payload.get("kind") == "chunk" else [str(s) for s in h.payload.get("sources") or []]
            ranked += [n for n in names if n not in ranked]
        gold = set(item["gold"])
        recall.append(len(gold & set(ranked)) / len(gold))
        first = next((i for i, name in enumerate(ranked) if name in gold), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
    wiki.close()
    print(f"recall_at_5: {statistics.fmean(recall):.6f}")
    print(f"search_p50_ms: {statistics.median(latency) * 1000:.3f}")
    print(f"mrr_at_5: {statistics.fmean(reciprocal):.6f}")
    return 0


def tuning_experiment(repeats: int, patience: int, max_attempts: int) -> dict:
    from hydrabrain.servers.loop.core import Loop
    from hydrabrain.shared.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "hydrabrain"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        (clone / PARAMS_FILE).parent.mkdir(parents=True, exist_ok=True)
        (clone / PARAMS_FILE).write_text(DEFAULTS)
        subprocess.run(["git", *IDENTITY, "add", PARAMS_FILE], cwd=clone, check=True)
        subprocess.run(["git", *IDENTITY, "commit", "-q", "-m", "tuning: the wiki's fusion weights at their defaults"], cwd=clone, check=True)
        wiki_home = Path(tmp) / "wiki-home"
        script = "benchmarks/loop_feedback.py"
        target = {
            "benchmark": [sys.executable, script, "measure-wiki", PARAMS_FILE, "--home", str(wiki_home)],
            "metric": "mrr_at_5", "direction": "higher",
            "test": [sys.executable, script, "measure-wiki", PARAMS_FILE, "--check"],
            "repeats": repeats, "patience": patience, "max_attempts": max_attempts,
            "search": {"file": PARAMS_FILE, "params": SPACE},
        }
        settings = load_settings(home=Path(tmp) / "home", loop={"memory": "off", "targets": {"wiki-fusion": target}})
        started = time.monotonic()
        result = Loop(settings).optimize(clone, "wiki-fusion", implementer="search")
        seconds = time.monotonic() - started
        history = Loop(settings).attempts(result.optimization_id).attempts
        # Recall@5 and p50 of the default and of the best, read from the benchmark's own output of one more run each.
        extra = {}
        for label, attempt in (("default", history[0]), ("best", result.best)):
            weights = DEFAULTS
            for name, value in (attempt.config or {}).items():
                weights = re.sub(rf"(?m)^{name.split('.')[1]} = .*$", f"{name.split('.')[1]} = {value}", weights)
            params = Path(tmp) / f"{label}.toml"
            params.write_text(weights)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "measure-wiki", str(params), "--home", str(wiki_home)],
                                 capture_output=True, text=True, check=True).stdout
            extra[label] = {k: float(v) for k, v in re.findall(r"^(\w+): ([\d.]+)$", out, re.M)}
    return {
        "target": {k: v for k, v in target.items() if k not in ("benchmark", "test")},
        "stopped": result.stopped, "attempts": result.attempts, "seconds": round(seconds, 1),
        "default": {"config": history[0].config, "measurement": history[0].measurement.model_dump(), **extra["default"]},
        "best": {"number": result.best.number, "config": result.best.config, "measurement": result.best.measurement.model_dump(),
                 **extra["best"]},
        "gain_vs_default": result.gain,
        "history": [{"number": a.number, "verdict": a.verdict, "summary": a.summary,
                     "mean": a.measurement.mean if a.measurement else None, "stdev": a.measurement.stdev if a.measurement else None}
                    for a in history],
    }


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    imp = sub.add_parser("implement", help="(used by the loop) the scripted implementer")
    imp.add_argument("task_file", type=Path)
    imp.add_argument("--seed", type=int, default=0)
    imp.add_argument("--ignore-feedback", action="store_true")
    meas = sub.add_parser("measure-wiki", help="(used by the tuning target) MRR@5 of wiki search with given weights")
    meas.add_argument("params", type=Path)
    meas.add_argument("--home", type=Path)
    meas.add_argument("--check", action="store_true")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--tuning-budget", type=int, default=16)
    parser.add_argument("--skip-feedback", action="store_true")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "implement":
        print(implement(args.task_file, args.seed, not args.ignore_feedback))
        return 0
    if args.command == "measure-wiki":
        return measure_wiki(args.params, args.home or Path(tempfile.mkdtemp()), args.check)

    results: dict = {"command": "python benchmarks/loop_feedback.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    if args.out.exists():
        results = {**json.loads(args.out.read_text()), **results}
    if not args.skip_feedback:
        print(f"Two-bug repo, attempts to PASS (loop.max_attempts = {args.max_attempts}), {args.seeds} seeds", flush=True)
        fb = results["feedback"] = feedback_experiment(args.seeds, args.max_attempts)
        print(f"\n{'implementer reads':<22} {'passed':>8} {'mean attempts':>14} {'median':>7} {'max':>5}")
        for label, key in (("the feedback", "with_feedback"), ("the problem only", "without_feedback")):
            s = fb[key]
            mean = f"{s['mean_attempts_to_pass']:.2f}" if s["mean_attempts_to_pass"] is not None else "-"
            print(f"{label:<22} {s['passed']:>5}/{s['runs']:<2} {mean:>14} {s['median_attempts_to_pass'] or '-':>7} {s['max_attempts_to_pass'] or '-':>5}")
        if fb["with_feedback"]["mean_attempts_to_pass"] and fb["without_feedback"]["mean_attempts_to_pass"]:
            print(f"without / with feedback, mean attempts = "
                  f"{fb['without_feedback']['mean_attempts_to_pass'] / fb['with_feedback']['mean_attempts_to_pass']:.2f}")
    if not args.skip_tuning:
        print("\nTuning the wiki's fusion weights against MRR@5 (built-in search)", flush=True)
        tu = results["tuning"] = tuning_experiment(args.repeats, args.patience, args.tuning_budget)
        d, b = tu["default"], tu["best"]
        print(f"{'':<9} {'MRR@5':>16} {'recall@5':>9} {'p50 ms':>7}  weights")
        for label, row in (("default", d), (f"best #{b['number']}", b)):
            m = row["measurement"]
            print(f"{label:<9} {m['mean']:>9.4f} ± {m['stdev']:<5.3f} {row.get('recall_at_5', 0):>9.4f} {row.get('search_p50_ms', 0):>7.2f}  {row['config']}")
        print(f"{tu['attempts']} attempts in {tu['seconds']} s; stopped: {tu['stopped']}; gain over the default {tu['gain_vs_default']:+.2%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
