"""KV memory against accuracy with TriAttention-style compaction, on SmolLM2-135M-Instruct.

Two tasks, each run with the full cache (the anchor) and with compaction at several budgets, in
the same process and through the same engine:

- pass-key retrieval: a pass key hidden in a long haystack of filler, then a long stretch of more
  filler, then the cue "The pass key is" as a completion. The stretch is long enough that several
  compaction passes run over the haystack before the cue is read, so accuracy measures what
  compaction kept. Accuracy = the five digits come back exactly.
- greedy continuations of long prose prompts: agreement of the generated tokens with the
  full-cache run (position by position, and the length of the common prefix).

KV bytes are the peak bytes the sequence held (blocks x bytes per block), so the ratio counts
what the pool must really provide. Compaction cost = seconds spent scoring and moving K/V as a
share of the decode time of the same run.

    python benchmarks/kv_compaction.py            # writes benchmarks/results/kv_compaction.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hydrabrain.inference.api import create_engine  # noqa: E402
from hydrabrain.inference.engine import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, rng: random.Random, haystack_tokens: int, gap_tokens: int) -> tuple[list[int], str]:
    key = f"{rng.randint(10000, 99999)}"
    filler_ids = tokenizer.encode(FILLER, add_special_tokens=False)
    reps = max(1, haystack_tokens // len(filler_ids))
    depth = rng.randint(reps // 5, (4 * reps) // 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    gap = FILLER * max(1, gap_tokens // len(filler_ids))
    text = (
        "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
        + FILLER * depth + needle + FILLER * (reps - depth) + gap
        + "What is the pass key? The pass key is"
    )
    return tokenizer.encode(text, add_special_tokens=False), key


def prose_prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    docs = sorted((ROOT / "examples" / "corpus").glob("*.md"))
    text = "\n\n".join(d.read_text(encoding="utf-8") for d in docs)
    ids = tokenizer.encode(text, add_special_tokens=False)
    step = max(1, (len(ids) - tokens) // max(1, n - 1))
    return [ids[i * step : i * step + tokens] for i in range(n)]


def run(engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list[dict]]:
    engine.finished_stats.clear()
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    engine.cache.assert_invariants()
    stats = [engine.finished_stats[i] for i in ids]
    return [out[i] for i in ids], [vars(s) for s in stats]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="pass-key prompts per budget")
    parser.add_argument("--haystack", type=int, default=2400, help="haystack tokens before the gap")
    parser.add_argument("--gap", type=int, default=800, help="filler tokens between the haystack and the cue")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 512, 384, 256])
    parser.add_argument("--prose", type=int, default=4, help="prose prompts for token agreement")
    parser.add_argument("--prose-tokens", type=int, default=1200)
    parser.add_argument("--continue-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk (tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest when the cores are shared with other work)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kv_compaction.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    started = time.perf_counter()
    engine, tok = create_engine("smollm2-135m", num_blocks=2048, max_batch=8, prefill_chunk=args.chunk)
    load_s = time.perf_counter() - started
    bpb = engine.cache.bytes_per_block
    rng = random.Random(1234)
    probes = [passkey_prompt(tok, rng, args.haystack, args.gap) for _ in range(args.samples)]
    prose = prose_prompts(tok, args.prose, args.prose_tokens)
    key_params = SamplingParams(max_tokens=8, temperature=0)
    prose_params = SamplingParams(max_tokens=args.continue_tokens, temperature=0, ignore_eos=True)

    rows = []
    full_prose: list[list[int]] | None = None
    for budget in [None, *args.budgets]:
        t0 = time.perf_counter()
        answers, key_stats = run(engine, [p for p, _ in probes], SamplingParams(**{**vars(key_params), "kv_budget": budget}))
        correct = sum(tok.decode(a).strip().startswith(k) for a, (_, k) in zip(answers, probes, strict=True))
        engine.decode_s = engine.compaction_s = 0.0
        conts, prose_stats = run(engine, prose, SamplingParams(**{**vars(prose_params), "kv_budget": budget}))
        decode_s, compaction_s = engine.decode_s, engine.compaction_s
        if full_prose is None:
            full_prose = conts
        agree = [sum(a == b for a, b in zip(c, f, strict=False)) / len(f) for c, f in zip(conts, full_prose, strict=True)]
        prefix = []
        for c, f in zip(conts, full_prose, strict=True):
            n = next((i for i, (a, b) in enumerate(zip(c, f, strict=False)) if a != b), min(len(c), len(f)))
            prefix.append(n / len(f))
        peak = sum(s["peak_blocks"] for s in key_stats) / len(key_stats)
        compactions = sum(s["compactions"] for s in key_stats) / len(key_stats)
        passes = sum(s["compactions"] for s in prose_stats)
        rows.append({
            "budget_tokens": budget,
            "prompt_tokens": sum(len(p) for p, _ in probes) / len(probes),
            "kv_bytes": peak * bpb,
            "blocks_freed": sum(s["blocks_freed"] for s in key_stats) / len(key_stats),
            "compactions_per_prompt": compactions,
            "accuracy": correct / len(probes),
            "token_agreement": sum(agree) / len(agree),
            "prefix_agreement": sum(prefix) / len(prefix),
            "prose_blocks_freed": sum(s["blocks_freed"] for s in prose_stats) / len(prose_stats),
            "compaction_ms_per_pass": 1000 * compaction_s / passes if passes else None,
            "compaction_share_of_decode": compaction_s / decode_s if decode_s else None,
            "seconds": time.perf_counter() - t0,
        })
        print(f"budget={budget}: accuracy {correct}/{len(probes)}, agreement {rows[-1]['token_agreement']:.3f}, {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)

    full = rows[0]
    for r in rows:
        r["kv_reduction"] = full["kv_bytes"] / r["kv_bytes"]
    header = f"{'budget':>7} {'KV MiB':>7} {'x less':>6} {'blocks freed':>12} {'passes':>6} {'accuracy':>8} {'agree':>6} {'prefix':>6} {'ms/pass':>7} {'share':>6}"
    print(f"SmolLM2-135M-Instruct, pass key in {full['prompt_tokens']:.0f}-token prompts (n={args.samples}), "
          f"{args.prose} prose prompts of {args.prose_tokens} tokens + {args.continue_tokens} greedy tokens; load {load_s:.0f} s")
    print(header)
    for r in rows:
        ms = f"{r['compaction_ms_per_pass']:.0f}" if r["compaction_ms_per_pass"] else "-"
        share = f"{r['compaction_share_of_decode']:.1%}" if r["compaction_share_of_decode"] is not None and r["budget_tokens"] else "-"
        print(f"{r['budget_tokens'] or 'full':>7} {r['kv_bytes'] / 2**20:7.1f} {r['kv_reduction']:6.1f} {r['blocks_freed']:12.1f} "
              f"{r['compactions_per_prompt']:6.1f} {r['accuracy']:8.0%} {r['token_agreement']:6.3f} {r['prefix_agreement']:6.3f} {ms:>7} {share:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "command": "python benchmarks/kv_compaction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads, "block_size": 16, "bytes_per_block": bpb, "prefill_chunk": args.chunk, "compaction_interval": engine.compaction_interval,
        "sinks": engine.sinks, "recent": engine.recent, "results": rows,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
