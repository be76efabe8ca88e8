"""Ingest with the encoder's batches of similar length against fixed batches of 32, in the same run.

`remember_turns` spends nearly all of its time in MiniLM, which pads each batch to its longest text.
This writes the same sessions (every ``--every``-th session of the conversations, one
`remember_turns` call each, through the domain API) into fresh data homes under two embedder
configurations, interleaved ``--reps`` times so that both see the same machine:

- before: fixed batches of 32 in length order (what `model.encode` does alone);
- now: texts batched with others at least 80 % as long, at most 8 at a time (`length_groups`).

Both turn encodings are run (`paired`, the default, and `single`). The result is each one's median
turns/s and the ratio. The data is not part of the project; pass its path:

    nice python benchmarks/memory_ingest_batching.py --data ../shared/data/conversations-dev.jsonl.xz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_conversations as mc  # noqa: E402

import hydrabrain.shared.embeddings as embeddings  # noqa: E402
from hydrabrain.servers.memory.core import MemoryService  # noqa: E402
from hydrabrain.shared.config import load_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory_ingest_batching.json"
CONFIGS = {"fixed batches of 32 (before)": (32, 1.0), "similar lengths, at most 8 (now)": (8, embeddings.PADDING_SHARE)}


def ingest_rate(batches: list[list[dict]], encoding: str, batch_size: int, padding: float) -> float:
    """Turns per second writing ``batches`` (one session each) into a fresh data home."""
    with tempfile.TemporaryDirectory(prefix="hb-ingest-") as home:
        os.environ["HYDRABRAIN_HOME"] = home
        os.environ["HYDRABRAIN_EMBEDDINGS_BATCH_SIZE"] = str(batch_size)
        os.environ["HYDRABRAIN_MEMORY_TURN_ENCODING"] = encoding
        service = MemoryService(load_settings())
        try:
            # set on the embedder itself: one may be shared between homes (with the content cache off)
            service.embedder.batch_size, service.embedder.padding = batch_size, padding  # padding 1.0: fixed batches
            service.embedder.embed(["warm up"])
            started = time.perf_counter()
            for n, turns in enumerate(batches):
                service.remember_turns(service.start_session("bench", f"session {n}").id, turns)
            return sum(len(b) for b in batches) / (time.perf_counter() - started)
        finally:
            service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="conversations JSON lines (.xz)")
    parser.add_argument("--every", type=int, default=3, help="write every Nth session of the conversations")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    convs = mc.load(args.data)
    batches = [[{"speaker": t["speaker"], "text": mc.turn_text(t), "at": at} for t in turns]
               for conv in convs for _, at, turns in mc.sessions(conv)][:: args.every]
    rates: dict[str, dict[str, list[float]]] = {}
    for rep in range(args.reps):
        for encoding in ("paired", "single"):
            for label, (size, padding) in CONFIGS.items():
                rate = ingest_rate(batches, encoding, size, padding)
                rates.setdefault(encoding, {}).setdefault(label, []).append(round(rate, 1))
                print(f"rep {rep + 1}/{args.reps} {encoding:6s} {label}: {rate:.1f} turns/s", file=sys.stderr, flush=True)
    before, now = CONFIGS
    result = {
        "command": "python benchmarks/memory_ingest_batching.py " + " ".join(sys.argv[1:]),
        "turns": sum(len(b) for b in batches), "calls": len(batches), "reps": args.reps,
        "turns_per_s": rates,
        "median_turns_per_s": {e: {k: statistics.median(v) for k, v in r.items()} for e, r in rates.items()},
        "ratio_now_over_before": {e: round(statistics.median(r[now]) / statistics.median(r[before]), 2) for e, r in rates.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for encoding, ratio in result["ratio_now_over_before"].items():
        print(f"{encoding}: {result['median_turns_per_s'][encoding]} -> {ratio}x")


if __name__ == "__main__":
    main()
