"""Decode speed of the paged engine against transformers' own ``generate``, same model, same prompts.

SmolLM2-135M-Instruct in fp32 on the CPU, greedy, prompts of equal length (no padding, so both
sides do the same work), batch 1 and batch 8. Decode throughput is taken the same way for both:
``B * (N - 1) / (t(N) - t(1))`` where ``t(n)`` is the wall time to generate ``n`` tokens per prompt,
so prefill cancels out. Runs alternate between the two and the median of the repeats is kept.

    python benchmarks/engine_speed.py            # writes benchmarks/results/engine_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hydrabrain.inference import models  # noqa: E402
from hydrabrain.inference.engine import Engine, SamplingParams  # noqa: E402
from hydrabrain.inference.llama import PagedLlama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prompts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    docs = sorted((ROOT / "examples" / "corpus").glob("*.md"))
    ids = tokenizer.encode("\n\n".join(d.read_text(encoding="utf-8") for d in docs), add_special_tokens=False)
    step = (len(ids) - tokens) // max(1, n - 1)
    return [ids[i * step : i * step + tokens] for i in range(n)]


def time_hf(hf, batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(batch)
    started = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - started, out[:, ids.shape[1] :].tolist()


def time_engine(engine: Engine, batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    out = engine.generate(batch, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest when the cores are shared with other work)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    hf, tokenizer = models.load("smollm2-135m")
    engine = Engine(PagedLlama(hf), tokenizer, num_blocks=1024, max_batch=max(args.batches), prefill_chunk=256)
    all_prompts = prompts(tokenizer, max(args.batches), args.prompt_tokens)
    time_hf(hf, all_prompts[:1], 4)  # warm both paths up
    time_engine(engine, all_prompts[:1], 4)

    rows = []
    for b in args.batches:
        batch = all_prompts[:b]
        runs: dict[str, list[float]] = {"transformers": [], "engine": []}
        agree = None
        for _ in range(args.repeats):
            t1, _ = time_hf(hf, batch, 1)
            tn, theirs = time_hf(hf, batch, args.tokens)
            runs["transformers"].append(b * (args.tokens - 1) / (tn - t1))
            t1, _ = time_engine(engine, batch, 1)
            tn, ours = time_engine(engine, batch, args.tokens)
            runs["engine"].append(b * (args.tokens - 1) / (tn - t1))
            agree = sum(x == y for o, t in zip(ours, theirs, strict=True) for x, y in zip(o, t, strict=True)) / (b * args.tokens)
        hf_tps, ours_tps = statistics.median(runs["transformers"]), statistics.median(runs["engine"])
        rows.append({"batch": b, "transformers_tok_s": hf_tps, "engine_tok_s": ours_tps, "ratio": ours_tps / hf_tps,
                     "greedy_token_agreement": agree, "runs": runs})
        print(f"batch {b}: transformers {hf_tps:.1f} tok/s, engine {ours_tps:.1f} tok/s", file=sys.stderr, flush=True)

    print(f"SmolLM2-135M-Instruct fp32, CPU ({torch.get_num_threads()} threads), {args.prompt_tokens}-token prompts, "
          f"{args.tokens} greedy tokens, median of {args.repeats}")
    print(f"{'batch':>5} {'transformers tok/s':>18} {'engine tok/s':>12} {'ratio':>6} {'same tokens':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['transformers_tok_s']:18.1f} {r['engine_tok_s']:12.1f} {r['ratio']:6.2f} {r['greedy_token_agreement']:11.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "command": "python benchmarks/engine_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "results": rows,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
