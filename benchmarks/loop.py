"""Loop cycle overhead at 10 and 100 findings, excluding the time inside the repo's own commands.

Each finding is a markdown issue in a real git repo; the test command and the implementer are
`true`, so what is left is the loop itself: discovery, SQLite bookkeeping, one git worktree per
finding, scope and fingerprint checks. Three cycles per size:
  cold    first cycle: discover and hand off every finding (one `git worktree add` each)
  warm    the same again: every step finds its work already done
  verify  with an implementer configured: implement + verify for every finding
The anchor is the bare cost of isolation measured in the same run: `git worktree add` run
directly N times. The ratio says how much the loop costs on top of the worktrees it must make.

    python benchmarks/loop.py [--sizes 10 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hydrabrain.servers.loop.core import Loop
from hydrabrain.shared.config import load_settings

IDENTITY = ["-c", "user.name=bench", "-c", "user.email=bench@hydrabrain.invalid"]
RESULTS = Path(__file__).parent / "results" / "loop.json"


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *IDENTITY, *args], cwd=repo, check=True, capture_output=True)


def make_repo(folder: Path, findings: int) -> Path:
    repo = folder / "repo"
    (repo / "issues").mkdir(parents=True)
    (repo / "src").mkdir()
    for n in range(findings):
        (repo / "src" / f"mod{n}.py").write_text(f"VALUE = {n}\n")
        (repo / "issues" / f"{n:04d}.md").write_text(f"# issue {n}\n\n`src/mod{n}.py` should export a function.\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "fixture")
    return repo


def raw_worktrees(folder: Path, repo: Path, n: int) -> float:
    """The anchor: what N worktrees cost with no loop around them."""
    started = time.perf_counter()
    for i in range(n):
        git(repo, "worktree", "add", "-q", "-b", f"raw/{i}", str(folder / "raw" / str(i)), "HEAD")
    return time.perf_counter() - started


def one_size(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        folder = Path(tmp)
        repo = make_repo(folder, n)
        settings = load_settings(home=folder / "home")
        settings.loop.test_command = ["true"]
        settings.loop.commit_scan_depth = 1
        settings.loop.max_findings_per_cycle = n
        settings.loop.max_commands_per_cycle = 3 * n + 10
        settings.loop.reviewer = False
        loop = Loop(settings)
        cold = loop.run_once(repo)
        warm = loop.run_once(repo)
        assert len(cold.plan) == n and all(v == "awaiting work" for v in warm.verdicts.values()), warm.verdicts
        settings.loop.implementer_command = ["true"]
        verified = loop.run_once(repo)
        assert all(v == "FAIL" for v in verified.verdicts.values())  # `true` changes nothing: FAIL is right
        anchor = raw_worktrees(folder, make_repo(folder / "anchor", n), n)
        return {
            "cold_overhead_s": cold.overhead_s, "warm_overhead_s": warm.overhead_s, "verify_overhead_s": verified.overhead_s,
            "verify_command_s": verified.command_s, "raw_worktree_add_s": anchor,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        samples = [one_size(n) for _ in range(args.repeats)]
        median = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        rows.append({"findings": n, **median, "samples": samples,
                     "cold_ratio_to_raw_git": median["cold_overhead_s"] / median["raw_worktree_add_s"]})
    header = f"{'findings':>8} {'cold s':>8} {'warm s':>8} {'verify s':>9} {'raw git s':>10} {'cold/raw':>9} {'warm ms/finding':>16} {'verify ms/finding':>18}"
    print(header)
    for r in rows:
        print(f"{r['findings']:>8} {r['cold_overhead_s']:>8.2f} {r['warm_overhead_s']:>8.2f} {r['verify_overhead_s']:>9.2f} "
              f"{r['raw_worktree_add_s']:>10.2f} {r['cold_ratio_to_raw_git']:>9.2f} "
              f"{1000 * r['warm_overhead_s'] / r['findings']:>16.1f} {1000 * r['verify_overhead_s'] / r['findings']:>18.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "loop cycle overhead (excluding the repo's commands), medians of repeats",
        "command": f"python benchmarks/loop.py --sizes {' '.join(map(str, args.sizes))} --repeats {args.repeats}",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"\nraw results: {RESULTS}")


if __name__ == "__main__":
    main()
