"""Wiki benchmark: retrieval quality on the sample corpus, and ingest throughput and search latency at scale.

1. Recall@5 on examples/corpus_questions.json: hybrid retrieval (dense + BM25 + link graph, RRF, coverage
   rerank) against plain dense top-k on the same embedded Qdrant Edge store, in the same run.
2. Synthetic wikis of 1k and 10k source documents, ingested through the real path (files, git, compile,
   MiniLM, Qdrant Edge, FTS5, graph): ingest documents/s, then search latency p50/p99 of the `search`
   operation (hybrid) against dense top-k on the same store.

    nice python benchmarks/wiki.py [--sizes 1000 10000] [--queries 200]

Prints a table and writes the raw numbers to benchmarks/results/wiki.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydrabrain.servers.wiki.core import Wiki  # noqa: E402
from hydrabrain.shared.config import load_settings  # noqa: E402
from hydrabrain.shared.retrieval import RetrievalHit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "corpus"
QUESTIONS = ROOT / "examples" / "corpus_questions.json"
RESULTS = ROOT / "benchmarks" / "results" / "wiki.json"


def _sources(hit: RetrievalHit) -> list[str]:
    if hit.payload.get("kind") == "chunk":
        return [str(hit.payload.get("source_id"))]
    return [str(s) for s in hit.payload.get("sources") or []]


def recall_on_corpus(home: Path, k: int = 5) -> dict:
    settings = load_settings(home=home, wiki={"allowed_roots": [str(CORPUS)]})
    wiki = Wiki(settings)
    wiki.ingest_many([(str(p), None) for p in sorted(CORPUS.glob("*.md"))])
    questions = json.loads(QUESTIONS.read_text())["questions"]
    rows = []
    for item in questions:
        gold = set(item["gold"])
        found = {}
        for name, hits in (("hybrid", wiki.retriever.search(item["question"], k)), ("dense", wiki.retriever.dense_only(item["question"], k))):
            got = {s for h in hits for s in _sources(h)}
            found[name] = {"recall": len(got & gold) / len(gold), "primary_hit": item["gold"][0] in got}
        rows.append({"question": item["question"], **found})
    wiki.close()
    summary = {
        name: {
            "recall_at_5": statistics.mean(r[name]["recall"] for r in rows),
            "primary_hit_at_5": statistics.mean(1.0 if r[name]["primary_hit"] else 0.0 for r in rows),
        }
        for name in ("hybrid", "dense")
    }
    return {"questions": len(rows), "k": k, "summary": summary, "per_question": rows}


# --- synthetic wikis ----------------------------------------------------------------------------

SERVICES = [f"{a}{b}" for a in ("Ash", "Birch", "Cedar", "Dune", "Elm", "Fern", "Glen", "Hazel", "Iris", "Juniper") for b in ("port", "flow", "gate", "line", "works", "cast", "mark", "hold", "vale", "reach")]
TEAMS = [f"Team {n}" for n in ("Albatross", "Bittern", "Crane", "Dunlin", "Egret", "Finch", "Grebe", "Harrier", "Ibis", "Jay", "Kite", "Lark")]
VERBS = ["stores", "routes", "prices", "audits", "schedules", "retries", "caches", "encrypts", "batches", "replays", "indexes", "throttles"]
OBJECTS = ["invoices", "parcels", "refunds", "delivery windows", "driver shifts", "stock levels", "coupons", "webhooks", "ledger entries", "route plans", "push messages", "tax reports"]
DETAILS = ["during the nightly run", "for every region", "with a two-hour delay", "behind a feature flag", "when the queue backs up", "before the cut-off", "after each deploy", "in small batches"]


def sentence_pool(rng: random.Random) -> list[list[str]]:
    """Three pools of synthetic sentences; a document is a title plus one sentence from each."""
    first = [f"{rng.choice(SERVICES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(DETAILS)}." for _ in range(600)]
    second = [f"It is owned by {rng.choice(TEAMS)} and calls {rng.choice(SERVICES)} for {rng.choice(OBJECTS)}." for _ in range(300)]
    third = [f"A failure returns ERR-{rng.randint(1000, 9999)}, and the on-call engineer follows the runbook." for _ in range(300)]
    return [list(dict.fromkeys(p)) for p in (first, second, third)]


def synthetic_doc(i: int, rng: random.Random, pool: list[list[str]]) -> tuple[str, str]:
    lead = rng.choice(pool[0])
    title = f"{lead.split()[0]} note {i}"
    return title, f"# {title}\n\n{lead} {rng.choice(pool[1])} {rng.choice(pool[2])}\n"


class SentenceVectors:
    """Stands in for the MiniLM forward pass while a large synthetic wiki is built: a text's vector is
    the normalised mean of the real MiniLM vectors of the pool sentences it contains. Everything else
    (files, git, compile, FTS5, graph, Qdrant Edge) runs for real; queries are embedded for real."""

    def __init__(self, embedder, pool: list[list[str]]) -> None:  # noqa: ANN001 - shared Embedder
        import numpy as np

        self.np = np
        self.embedder = embedder
        self.real_embed = embedder.embed
        sentences = [s for part in pool for s in part]
        self.vectors = dict(zip(sentences, self.real_embed(sentences), strict=True))

    def embed(self, texts):  # noqa: ANN001, ANN201 - same signature as Embedder.embed
        out: list = []
        missing: list[int] = []
        for i, text in enumerate(texts):
            found = [v for sentence, v in self.vectors.items() if sentence in text]
            if found:
                mean = self.np.mean(found, axis=0)
                out.append(mean / self.np.linalg.norm(mean))
            else:
                out.append(None)
                missing.append(i)
        if missing:
            for i, vector in zip(missing, self.real_embed([texts[i] for i in missing]), strict=True):
                out[i] = vector
        if not out:
            return self.real_embed(texts)
        return self.np.stack(out).astype(self.np.float32)


def scale_run(size: int, queries: int, home: Path, sentence_vectors: bool, batch: int = 1000) -> dict:
    rng = random.Random(size)
    pool = sentence_pool(random.Random(1))
    settings = load_settings(home=home)
    wiki = Wiki(settings)
    wiki.retriever  # load the model before timing  # noqa: B018
    stand_in = SentenceVectors(wiki.embedder, pool) if sentence_vectors else None
    if stand_in is not None:
        wiki.embedder.embed = stand_in.embed  # type: ignore[method-assign]
    docs = [synthetic_doc(i, rng, pool) for i in range(size)]
    started = time.perf_counter()
    for start in range(0, size, batch):
        wiki.ingest_many([(body, title) for title, body in docs[start : start + batch]])
    ingest_s = time.perf_counter() - started
    pages = len(wiki.pages())
    if stand_in is not None:
        wiki.embedder.embed = stand_in.real_embed  # type: ignore[method-assign]

    qrng = random.Random(7)
    questions = []
    for _ in range(queries):
        kind = qrng.random()
        if kind < 0.4:
            questions.append(f"which service {qrng.choice(VERBS)} {qrng.choice(OBJECTS)}")
        elif kind < 0.7:
            questions.append(f"who owns {qrng.choice(SERVICES)}")
        else:
            questions.append(f"what does {qrng.choice(pool[2]).split('returns ')[1].split(',')[0]} mean")
    # Query embedding is the same MiniLM call for both, so it is timed on its own (on unseen strings)
    # and both retrievers are then timed with the query vector already cached.
    embed_ms = []
    for q in questions:
        t0 = time.perf_counter()
        wiki.embedder.embed_one(f"{q} ({size})")  # unseen, so the model runs
        embed_ms.append((time.perf_counter() - t0) * 1000)
    wiki.embedder.embed(questions)
    for q in questions[:5]:
        wiki.search(q)
        wiki.retriever.dense_only(q, 8)
    hybrid, dense = [], []
    for q in questions:
        t0 = time.perf_counter()
        wiki.search(q, 8)
        hybrid.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        wiki.retriever.dense_only(q, 8)
        dense.append((time.perf_counter() - t0) * 1000)
    wiki.close()

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {
        "documents": size,
        "embeddings": "MiniLM per sentence, mixed per item (see SentenceVectors)" if sentence_vectors else "MiniLM per item (the real path)",
        "pages": pages,
        "ingest_seconds": ingest_s,
        "ingest_docs_per_s": size / ingest_s,
        "queries": queries,
        "search_ms": {"p50": pct(hybrid, 50), "p99": pct(hybrid, 99), "mean": statistics.mean(hybrid)},
        "dense_ms": {"p50": pct(dense, 50), "p99": pct(dense, 99), "mean": statistics.mean(dense)},
        "query_embedding_ms": {"p50": pct(embed_ms, 50), "p99": pct(embed_ms, 99)},
        "load_average_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000], help="synthetic wiki sizes (documents)")
    parser.add_argument("--queries", type=int, default=200, help="queries timed per size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--real-embeddings-up-to", type=int, default=1000, help="larger sizes use sentence-level vectors (see SentenceVectors)")
    args = parser.parse_args(argv)

    results: dict = {
        "command": "python benchmarks/wiki.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(), "load_average_at_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="wiki-bench-") as tmp:
        results["recall"] = recall_on_corpus(Path(tmp) / "corpus")
        results["scale"] = [scale_run(size, args.queries, Path(tmp) / f"scale-{size}", size > args.real_embeddings_up_to) for size in args.sizes]

    recall = results["recall"]["summary"]
    print(f"\nRecall on the sample corpus ({results['recall']['questions']} questions, top {results['recall']['k']})")
    print(f"{'retrieval':<10} {'recall@5':>9} {'primary hit@5':>14}")
    for name in ("hybrid", "dense"):
        print(f"{name:<10} {recall[name]['recall_at_5']:>9.3f} {recall[name]['primary_hit_at_5']:>14.3f}")
    ratio = recall["hybrid"]["recall_at_5"] / max(recall["dense"]["recall_at_5"], 1e-9)
    print(f"hybrid / dense recall@5 = {ratio:.3f}")

    print("\nScale (synthetic documents; search = hybrid `search`, anchor = dense top-k on the same store;")
    print("both with the query vector cached; + embed = the MiniLM query embedding both need)")
    print(f"{'docs':>6} {'pages':>6} {'ingest doc/s':>12} {'search p50':>11} {'search p99':>11} {'dense p50':>10} {'dense p99':>10} {'p50 ratio':>10} {'+ embed p50':>12}")
    for row in results["scale"]:
        s, d, e = row["search_ms"], row["dense_ms"], row["query_embedding_ms"]
        print(f"{row['documents']:>6} {row['pages']:>6} {row['ingest_docs_per_s']:>12.1f} {s['p50']:>9.2f}ms {s['p99']:>9.2f}ms {d['p50']:>8.2f}ms {d['p99']:>8.2f}ms {s['p50'] / d['p50']:>10.2f} {e['p50']:>10.2f}ms")
    print("ingest doc/s above the real-embedding size excludes the per-item MiniLM pass (sentence vectors stand in)")
    print(f"load average at start: {results['machine']['load_average_at_start'][0]:.1f} on {os.cpu_count()} CPUs")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nraw results: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
