"""CRAG against plain top-k RAG on one question set, side by side in one run.

The local corpus (benchmarks/data/crag/local/*.md) is indexed in the wiki's layout; the "web"
corpus (benchmarks/data/crag/web/*.html) is served by the loopback SearXNG-compatible server the
tests use. Questions are answerable from the local corpus, only from the web, or from neither.

Reported per system: action accuracy (CRAG only: correct for local questions, incorrect for the
others), the share of questions whose gold evidence is in the final context, context tokens, the
share of context tokens that are irrelevant (in a strip or chunk without the gold evidence; all of
it for unanswerable questions), and latency per question (after the question's embedding, which
every system needs and is computed once up front).

    nice python benchmarks/crag.py [--budget 160] [--k 5] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "crag"
sys.path.insert(0, str(ROOT / "tests" / "crag"))

import anyio  # noqa: E402

from hydrabrain.servers.crag.core import Crag, build_evaluator  # noqa: E402
from hydrabrain.shared.config import load_settings  # noqa: E402
from hydrabrain.shared.embeddings import get_embedder  # noqa: E402
from hydrabrain.shared.lexical import open_lexical_index  # noqa: E402
from hydrabrain.shared.retrieval import HybridRetriever  # noqa: E402
from hydrabrain.shared.vectors import open_vector_store  # noqa: E402
from searx_server import SearchServer  # noqa: E402
from wiki_layout import index_wiki  # noqa: E402

GOLD_ACTION = {"local": "correct", "web": "incorrect", "neither": "incorrect"}


def contains(text: str, gold: str | None) -> bool:
    return gold is not None and gold.lower() in text.lower()


def score_context(pieces: list[str], gold: str | None, count) -> dict:  # noqa: ANN001 - count_tokens
    tokens = [count(p) for p in pieces]
    relevant = [contains(p, gold) for p in pieces]
    return {
        "tokens": sum(tokens),
        "irrelevant_tokens": sum(t for t, r in zip(tokens, relevant, strict=True) if not r),
        "gold_in_context": contains("\n".join(pieces), gold),
    }


def summarise(rows: list[dict], system: str) -> dict:
    picked = [r[system] for r in rows]
    answerable = [r[system] for r in rows if r["kind"] != "neither"]
    tokens = sum(p["tokens"] for p in picked)
    latencies = sorted(p["latency_ms"] for p in picked)
    out = {
        "gold_in_context": sum(p["gold_in_context"] for p in answerable) / max(1, len(answerable)),
        "mean_context_tokens": tokens / max(1, len(picked)),
        "irrelevant_token_share": sum(p["irrelevant_tokens"] for p in picked) / max(1, tokens),
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_mean": statistics.fmean(latencies),
        "latency_ms_p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }
    for kind in ("local", "web"):
        part = [r[system] for r in rows if r["kind"] == kind]
        out[f"gold_in_context_{kind}"] = sum(p["gold_in_context"] for p in part) / max(1, len(part))
    if "action" in picked[0]:
        out["action_accuracy"] = sum(r[system]["action"] == GOLD_ACTION[r["kind"]] for r in rows) / len(rows)
        for kind in ("local", "web", "neither"):
            part = [r for r in rows if r["kind"] == kind]
            out[f"action_accuracy_{kind}"] = sum(r[system]["action"] == GOLD_ACTION[kind] for r in part) / max(1, len(part))
        out["ambiguous_share"] = sum(r[system]["action"] == "ambiguous" for r in rows) / len(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5, help="documents retrieved per question (both systems)")
    parser.add_argument("--budget", type=int, default=160, help="CRAG token budget")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (smoke runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crag.json")
    args = parser.parse_args()

    questions = json.loads((DATA / "questions.json").read_text(encoding="utf-8"))
    if args.limit:
        questions = questions[: args.limit]
    home = Path(tempfile.mkdtemp(prefix="crag-bench-"))
    settings = load_settings(home=home)
    embedder = get_embedder(settings)
    sources = {}
    for path in sorted((DATA / "local").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        sources[path.stem] = (text.splitlines()[0].lstrip("# ").strip(), text)
    started = time.perf_counter()
    items = index_wiki(settings, embedder, sources)
    index_s = time.perf_counter() - started

    retriever = HybridRetriever(
        embedder,
        open_vector_store(settings, "wiki", embedder.dim, ("kind", "source_id", "slug")),
        open_lexical_index(settings, "wiki"),
    )
    rows: list[dict] = []
    with SearchServer.from_folder(DATA / "web") as web:
        settings.crag.web_search_url = web.url
        settings.crag.allow_private_urls = True  # the benchmark's web lives on 127.0.0.1
        crag = Crag(settings, embedder, build_evaluator(settings, embedder))
        # One warm-up so the first question does not pay for lazy imports.
        anyio.run(lambda: crag.retrieve("warm up", k=args.k, token_budget=args.budget))
        for q in questions:
            row = {"question": q["question"], "kind": q["kind"], "gold": q["gold"]}
            # Every system embeds the question the same way; embed it once up front so the first
            # system timed does not pay for the others (the embedder caches by content).
            embedder.embed_one(q["question"])
            plain = (
                ("plain_hybrid", retriever.search, args.k),
                ("plain_dense", retriever.dense_only, args.k),
                ("plain_hybrid_top1", retriever.search, 1),  # plain RAG cut to CRAG's token count
            )
            for system, search, k in plain:
                t0 = time.perf_counter()
                hits = search(q["question"], k)
                latency = (time.perf_counter() - t0) * 1000
                row[system] = {**score_context([h.text for h in hits], q["gold"], embedder.count_tokens), "latency_ms": latency}
            t0 = time.perf_counter()
            result = anyio.run(lambda: crag.retrieve(q["question"], k=args.k, token_budget=args.budget))  # noqa: B023
            latency = (time.perf_counter() - t0) * 1000
            row["crag"] = {
                **score_context([s.text for s in result.strips], q["gold"], embedder.count_tokens),
                "latency_ms": latency,
                "action": result.action,
                "confidence": result.confidence,
                "web_used": result.web_used,
                "rewritten_query": result.rewritten_query,
            }
            rows.append(row)
        crag.close()

    summary = {name: summarise(rows, name) for name in ("plain_hybrid", "plain_dense", "plain_hybrid_top1", "crag")}
    plain, crag_s = summary["plain_hybrid"], summary["crag"]
    ratios = {
        "gold_in_context_points_over_plain": 100 * (crag_s["gold_in_context"] - plain["gold_in_context"]),
        "context_tokens_ratio_to_plain": crag_s["mean_context_tokens"] / plain["mean_context_tokens"],
        "irrelevant_share_ratio_to_plain": crag_s["irrelevant_token_share"] / max(plain["irrelevant_token_share"], 1e-9),
        "latency_ratio_to_plain": crag_s["latency_ms_p50"] / plain["latency_ms_p50"],
    }
    counts = {k: sum(q["kind"] == k for q in questions) for k in ("local", "web", "neither")}

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:5.1f}%"

    print(f"\n{len(questions)} questions ({counts}); local index: {items} items in {index_s:.1f} s; k={args.k}, CRAG budget {args.budget} tokens\n")
    header = f"{'system':18} {'action acc':>10} {'gold in ctx':>11} {'  local':>8} {'    web':>8} {'ctx tokens':>10} {'irrelevant':>10} {'p50 ms':>8} {'p95 ms':>8}"
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        print(
            f"{name:18} {pct(s.get('action_accuracy')):>10} {pct(s['gold_in_context']):>11} {pct(s['gold_in_context_local']):>8} "
            f"{pct(s['gold_in_context_web']):>8} {s['mean_context_tokens']:10.1f} {pct(s['irrelevant_token_share']):>10} "
            f"{s['latency_ms_p50']:8.1f} {s['latency_ms_p95']:8.1f}"
        )
    print(
        f"\nCRAG vs plain hybrid top-{args.k}: gold evidence {ratios['gold_in_context_points_over_plain']:+.1f} points, "
        f"context tokens x{ratios['context_tokens_ratio_to_plain']:.2f}, irrelevant share x{ratios['irrelevant_share_ratio_to_plain']:.2f}, "
        f"p50 latency x{ratios['latency_ratio_to_plain']:.1f}"
    )
    c = summary["crag"]
    print(
        f"CRAG action accuracy by kind: local {pct(c['action_accuracy_local'])}, web {pct(c['action_accuracy_web'])}, "
        f"neither {pct(c['action_accuracy_neither'])}; ambiguous {pct(c['ambiguous_share'])}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "nice python benchmarks/crag.py " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end",
                "k": args.k,
                "budget": args.budget,
                "counts": counts,
                "summary": summary,
                "ratios": ratios,
                "rows": rows,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
