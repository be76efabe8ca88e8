"""KV compaction policies against the full cache: a needle suite on natural prose, on SmolLM2-135M-Instruct.

In the manner of RULER, every probe hides facts in held-out prose (PEP paragraphs, the held-out split
only) and ends with a completion cue, since this small model completes "The pass key is" where it
fails the question form:

- ``single``: one pass key; ``multikey``: four keys for four names, the cue names one;
- ``multivalue``: three numbers of one name, all three must come back;
- ``vartrack``: a chain ``X1 = 5 ... X2 = X1 ... X3 = X2``; the cue asks for X3's number;
- ``agreement``: greedy agreement of the first 64 tokens continuing real prose with the full cache's.

Two settings per needle task, on the very same tokens: ``question_in_prompt`` (the prompt-end pass
runs after the question, so query-aware selection can see it) and ``question_after`` (the pass runs
where the document ends, ``kv_document_tokens``: the question arrives after compaction, as when one
cached document serves several questions). A policy named ``NAME+spill`` (``heads+spill``) runs with
``kv_spill``: the prompt's K/V also goes to a host tier, and once the question has been read the
survivors are chosen again by its attention and it is read anew over them (in ``question_in_prompt``
it changes nothing: the prompt-end pass already sees the question). ``kv_bytes_host`` reports that
tier. Every policy and the full cache run in the same process
through the same engine. KV bytes count blocks held (reserved whole-K/V blocks included) at the peak
and in steady state (while decoding).

    python benchmarks/kv_compaction.py --filler ../shared/data/peps.jsonl.xz   # the full grid
    python benchmarks/kv_compaction.py --filler ... --lengths 2048 --budgets 8 --samples 5   # a reduced one
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hydrabrain.inference.api import create_engine  # noqa: E402
from hydrabrain.inference.engine import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("single", "multikey", "multivalue", "vartrack", "agreement")
SETTINGS = ("question_in_prompt", "question_after")
POLICIES = ("recent", "h2o", "snapkv", "triattention", "heads")
NAMES = ("the red lighthouse", "the silver orchard", "the copper bridge", "the quiet harbour", "the amber valley", "the stone mill")


def prose_paragraphs(path: str, split: str) -> list[str]:
    """Paragraphs of plain prose (no code, no headers, no tables) from one split of the PEP corpus."""
    out = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] != split:
                continue
            for para in re.split(r"\n\s*\n", row["text"]):
                text = " ".join(para.split())
                if len(text) < 200 or para.startswith((" ", "\t", "..", "=", "-", "*", "+", "|", ">")) or ":" in para.split("\n")[0][:20]:
                    continue
                letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
                if letters > 0.9:
                    out.append(text)
    return out


class Filler:
    def __init__(self, paragraphs: list[str], tokenizer) -> None:
        self.paragraphs = paragraphs
        self.tok = tokenizer

    def take(self, rng: random.Random, tokens: int) -> list[str]:
        """Consecutive paragraphs from a random start, about ``tokens`` tokens in all."""
        start = rng.randrange(len(self.paragraphs))
        out, n = [], 0
        i = start
        while n < tokens:
            para = self.paragraphs[i % len(self.paragraphs)]
            out.append(para)
            n += len(self.tok.encode(" " + para, add_special_tokens=False))
            i += 1
        return out


def _number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def build_probe(task: str, filler: Filler, tok, rng: random.Random, length: int) -> dict:
    """A document with facts planted at random depths, then the question (cue); answers to check."""
    if task == "single":
        key = _number(rng)
        facts = [f"The pass key is {key}. Remember it. {key} is the pass key."]
        cue, answers, max_tokens = "What is the pass key? The pass key is", [key], 8
    elif task == "multikey":
        names = rng.sample(NAMES, 4)
        keys = [_number(rng) for _ in names]
        facts = [f"The pass key for {n} is {k}." for n, k in zip(names, keys, strict=True)]
        pick = rng.randrange(4)
        cue, answers, max_tokens = f"What is the pass key for {names[pick]}? The pass key for {names[pick]} is", [keys[pick]], 8
    elif task == "multivalue":
        name = rng.choice(NAMES)
        values = [_number(rng) for _ in range(3)]
        facts = [f"One of the special numbers for {name} is {v}." for v in values]
        cue, answers, max_tokens = f"What are all the special numbers for {name}? The special numbers for {name} are", values, 24
    else:  # vartrack
        value = _number(rng)
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) for _ in range(3)]
        facts = [f"VAR {names[0]} = {value}.", f"VAR {names[1]} = VAR {names[0]}.", f"VAR {names[2]} = VAR {names[1]}."]
        cue, answers, max_tokens = f"Which number does VAR {names[2]} hold? Follow the assignments. VAR {names[2]} holds the number", [value], 8
    intro = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    fact_tokens = sum(len(tok.encode(" " + f, add_special_tokens=False)) for f in facts)
    room = length - len(tok.encode(intro + "\n\n" + cue, add_special_tokens=False)) - fact_tokens
    paragraphs = filler.take(rng, room)
    ids: list[int] = []
    while True:  # trim the filler to fit the length exactly enough
        depths = sorted(rng.sample(range(1, len(paragraphs)), min(len(facts), len(paragraphs) - 1)))
        depths += [len(paragraphs) - 1] * (len(facts) - len(depths))
        pieces = list(paragraphs)
        for offset, (d, fact) in enumerate(zip(depths, facts, strict=True)):
            pieces.insert(d + offset, fact)
        document = intro + " ".join(pieces)
        doc_ids = tok.encode(document, add_special_tokens=False)
        question = tok.encode("\n\n" + cue, add_special_tokens=False)
        if len(doc_ids) + len(question) <= length or len(paragraphs) <= 2:
            ids = doc_ids[: length - len(question)] + question
            break
        paragraphs = paragraphs[:-1]
    return {"ids": ids, "document_tokens": len(ids) - len(question), "answers": answers, "max_tokens": max_tokens}


def prose_probe(filler: Filler, tok, rng: random.Random, length: int) -> dict:
    ids = tok.encode(" ".join(filler.take(rng, length + 50)), add_special_tokens=False)[:length]
    return {"ids": ids, "document_tokens": None, "answers": [], "max_tokens": 64}


def correct(tok, generated: list[int], answers: list[str]) -> bool:
    text = tok.decode(generated, skip_special_tokens=True)
    return all(a in text for a in answers)


def run(engine, probes: list[dict], policy: str | None, budget: int | None, setting: str, greedy_eos: bool) -> tuple[list[list[int]], list, float]:
    engine.finished_stats.clear()
    started = time.perf_counter()
    ids = []
    for p in probes:
        doc = p["document_tokens"] if setting == "question_after" and policy is not None else None
        name, spill = split_spill(policy)
        params = SamplingParams(max_tokens=p["max_tokens"], temperature=0, ignore_eos=not greedy_eos, kv_budget=budget,
                                kv_policy=name, kv_document_tokens=doc, kv_spill=spill)
        ids.append(engine.add_request(p["ids"], params))
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    engine.cache.assert_invariants()
    return [out[i] for i in ids], [engine.finished_stats[i] for i in ids], time.perf_counter() - started


def split_spill(policy: str | None) -> tuple[str | None, bool]:
    """``heads+spill`` names the heads policy with the host spill tier (``kv_spill``)."""
    if policy is None:
        return None, False
    name, _, option = policy.partition("+")
    if option not in ("", "spill"):
        raise SystemExit(f"unknown policy option {option!r} in {policy!r}: only +spill")
    return name, option == "spill"


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=False)) / max(1, len(b))


def concurrency(engine_factory, tok, filler: Filler, policies: list[str | None], requests: int, length: int, pool: int, max_tokens: int = 16) -> list[dict]:
    """How many 4k-token requests one fixed pool runs at once, and the aggregate decode tokens/s."""
    rows = []
    rng = random.Random(7)
    prompts = [prose_probe(filler, tok, rng, length)["ids"] for _ in range(requests)]
    for policy in policies:
        engine = engine_factory(pool)
        budget = None if policy is None else length // 8
        name, spill = split_spill(policy)
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, kv_budget=budget, kv_policy=name, kv_spill=spill))
        most_running = most_decoding = 0
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
            most_running = max(most_running, len(engine.running))
            most_decoding = max(most_decoding, sum(1 for r in engine.running if r.output))
        wall = time.perf_counter() - started
        rows.append({"policy": policy or "full", "pool_blocks": pool, "requests": requests, "length": length, "budget_tokens": budget,
                     "max_tokens": max_tokens, "max_batch": engine.max_batch,
                     "most_admitted": most_running, "most_decoding": most_decoding,
                     "decode_tokens_per_s": engine.decode_tokens / engine.decode_s if engine.decode_s else None,
                     "tokens_per_s_wall": engine.decode_tokens / wall, "wall_s": wall})
        print(f"concurrency {policy or 'full'}: admitted at most {most_running}, decoding {most_decoding}, "
              f"{rows[-1]['decode_tokens_per_s']:.1f} decode tok/s, {wall:.0f} s", file=sys.stderr, flush=True)
        del engine
    return rows


def admission(engine, policies: list[str | None], length: int, pool: int, max_tokens: int = 64) -> list[dict]:
    """The engine's own admission arithmetic for one fixed pool: blocks a ``length``-token request reserves
    while its prompt is read (peak) and once it decodes (steady), and how many fit at once. Nothing runs."""
    rows = []
    for policy in policies:
        budget = None if policy is None else length // 8
        name, spill = split_spill(policy)
        rid = engine.add_request(list(range(5, 5 + length)), SamplingParams(max_tokens=max_tokens, temperature=0, kv_budget=budget, kv_policy=name, kv_spill=spill))
        r = next(r for r in engine.waiting if r.id == rid)
        peak, steady = r.need_blocks, r.steady_need if budget is not None else r.need_blocks
        engine.waiting.remove(r)
        # Prompt-end policies: one request at its peak while reading, the others at their steady share.
        at_once = pool // peak if peak == steady else 1 + (pool - peak) // steady if pool >= peak else 0
        rows.append({"policy": policy or "full", "pool_blocks": pool, "length": length, "budget_tokens": budget,
                     "blocks_peak": peak, "blocks_steady": steady, "requests_at_once": at_once})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", required=True, help="the PEP corpus (JSON lines with split and text); held-out rows are the filler")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model served: a name or a folder; a converted HydraHead folder (`hydrabrain model convert`) compacts its FA heads only")
    parser.add_argument("--samples", type=int, default=20, help="probes per cell")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16], help="budget = prompt length / this")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--heads-file", default=str(RESULTS / "kv_heads_smollm2.json"), help="head ranking of the heads policy (computed if missing)")
    parser.add_argument("--calibration-tokens", type=int, default=4096, help="train-split prose the triattention statistics are calibrated on")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole-heads", type=int, default=3, metavar="N", help="KV heads the heads policy keeps whole")
    parser.add_argument("--snapkv-chunk", type=int, default=None, metavar="C",
                        help="choose whole C-token chunks by their mean vote (0: single tokens; default: the engine's, 16)")
    parser.add_argument("--spill-format", default="float16", choices=("float16", "int8"), help="how the host tier stores K/V (NAME+spill policies)")
    parser.add_argument("--spill-rounds", type=int, default=None, metavar="N",
                        help="re-selections after a question that follows a spilled document (policies named NAME+spill; default: the engine's)")
    parser.add_argument("--spill-recall", type=int, default=None, metavar="N",
                        help="a question after a spilled document is read over N times the budget before the cut to it "
                             "(1: over the budget; default: the engine's)")
    parser.add_argument("--concurrency", type=int, default=0, metavar="N", help="also run N concurrent 4k-token requests through one fixed pool")
    parser.add_argument("--concurrency-pool", type=int, default=600, help="blocks in that pool")
    parser.add_argument("--concurrency-tokens", type=int, default=16, help="tokens each of those requests decodes; longer keeps early requests running while later ones are read")
    parser.add_argument("--max-batch", type=int, default=8, help="requests the engine runs at once (the concurrency run's ceiling besides the pool)")
    parser.add_argument("--concurrency-policies", nargs="+", default=["heads", "h2o"])
    parser.add_argument("--admission", action="store_true", help="also report how many 4k-token requests the engine admits into --concurrency-pool blocks (no run)")
    parser.add_argument("--admission-pools", type=int, nargs="+", default=None, metavar="BLOCKS", help="pools the admission arithmetic is done for (default: --concurrency-pool)")
    parser.add_argument("--out", default=str(RESULTS / "kv_compaction.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoTokenizer

    from hydrabrain.inference.models import resolve

    t0 = time.perf_counter()
    src = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file, local_files_only=True)
    # Calibration reads real text (the train split, never the held-out filler), not one paragraph.
    calibration = " ".join(Filler(prose_paragraphs(args.filler, "train"), tok).take(random.Random(99), args.calibration_tokens))

    def make_engine(blocks: int):
        engine = create_engine(args.model, num_blocks=blocks, max_batch=args.max_batch, prefill_chunk=args.chunk, heads_file=args.heads_file,
                               rank_if_missing=True, calibration_text=calibration, whole_heads=args.whole_heads, snapkv_chunk=args.snapkv_chunk)[0]
        if args.spill_rounds is not None:
            engine.spill_rounds = args.spill_rounds
        if args.spill_recall is not None:
            engine.spill_recall = args.spill_recall
        engine.spill_format = args.spill_format
        return engine

    engine = make_engine(8 * (max(args.lengths) + 128) // 16 + 64)
    load_s = time.perf_counter() - t0
    bpb = engine.cache.bytes_per_block
    filler = Filler(prose_paragraphs(args.filler, "heldout"), tok)
    print(f"{len(filler.paragraphs)} held-out prose paragraphs; engine ready in {load_s:.0f} s", file=sys.stderr, flush=True)

    out_path = Path(args.out)
    meta = {
        "model": describe_model(args.model),
        "command": "python benchmarks/kv_compaction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads, "block_size": 16, "bytes_per_block": bpb, "prefill_chunk": args.chunk,
        "compaction_interval": engine.compaction_interval, "sinks": engine.sinks, "recent": engine.recent,
        "snapkv_window": engine.snapkv_window, "snapkv_pool": engine.snapkv_pool, "snapkv_chunk": engine.snapkv_chunk,
        "whole_heads": engine.head_ranking[: engine.whole_heads] if engine.head_ranking else None,
        "auto": engine.auto_policy, "samples": args.samples, "spill_rounds": engine.spill_rounds, "spill_recall": engine.spill_recall, "spill_format": engine.spill_format,
    }
    cells: list[dict] = []
    extra: dict = {}

    def save(more: dict | None = None) -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({**meta, **extra, **(more or {}), "cells": cells}, indent=1))

    if args.admission:
        policies = [None, *args.concurrency_policies, *(p for p in ("snapkv", "recent", "triattention") if p not in args.concurrency_policies)]
        extra["admission"] = [row for pool in args.admission_pools or [args.concurrency_pool] for row in admission(engine, policies, 4096, pool)]
        for row in extra["admission"]:
            print(f"admission {row}", file=sys.stderr, flush=True)
        save()

    for length in args.lengths:
        for task in args.tasks:
            rng = random.Random(f"{task}-{length}")
            probes = [prose_probe(filler, tok, rng, length) if task == "agreement" else build_probe(task, filler, tok, rng, length) for _ in range(args.samples)]
            settings = ["question_in_prompt"] if task == "agreement" else args.settings
            full, full_stats, full_s = run(engine, probes, None, None, "question_in_prompt", greedy_eos=task != "agreement")
            for setting in settings:  # the full cache does not depend on where the question arrives
                cells.append(_cell("full", task, setting, length, None, probes, full, full, full_stats, full_s, tok, bpb))
            print(_line(cells[-1]), file=sys.stderr, flush=True)
            for divisor in args.budgets:
                budget = length // divisor
                for policy in args.policies:
                    for setting in settings:
                        try:
                            got, stats, secs = run(engine, probes, policy, budget, setting, greedy_eos=task != "agreement")
                        except ValueError as exc:  # a budget the policy cannot meet (RequestRejected)
                            cells.append({"policy": policy, "task": task, "setting": setting, "length": length, "budget_tokens": budget, "error": str(exc)})
                            print(f"{policy} {task} {setting} {budget}: {exc}", file=sys.stderr, flush=True)
                            continue
                        cells.append(_cell(policy, task, setting, length, budget, probes, got, full, stats, secs, tok, bpb))
                        print(_line(cells[-1]), file=sys.stderr, flush=True)
                        save()
    save()
    if args.concurrency:
        extra["concurrency"] = concurrency(make_engine, tok, filler, [None, *args.concurrency_policies], args.concurrency, 4096, args.concurrency_pool,
                                           args.concurrency_tokens)
        save(extra)
    _print_table(cells)
    return 0


def describe_model(model: str) -> str:
    """What was served, in words: a converted HydraHead folder names its teacher and FA groups."""
    if model == "smollm2-135m":
        return "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    report = Path(model) / "conversion.json"
    if report.is_file():
        r = json.loads(report.read_text())
        window = r.get("recipe", {}).get("gdn_window", 0)
        return f"HydraHead converted from {r.get('teacher')}: {r.get('fa_groups')} of {r.get('total_groups')} KV groups FA ({r.get('selection')}), GDN window {window}"
    return model


def _cell(policy, task, setting, length, budget, probes, got, full, stats, secs, tok, bpb) -> dict:
    passes = sum(s.compactions for s in stats)
    acc = None if task == "agreement" else sum(correct(tok, g, p["answers"]) for g, p in zip(got, probes, strict=True)) / len(probes)
    return {
        "policy": policy, "task": task, "setting": setting, "length": length, "budget_tokens": budget,
        "accuracy": acc,
        "token_agreement": sum(agreement(g, f) for g, f in zip(got, full, strict=True)) / len(got),
        "kv_bytes_peak": sum(s.peak_blocks for s in stats) / len(stats) * bpb,
        "kv_bytes_steady": sum(s.steady_blocks for s in stats) / len(stats) * bpb,
        "blocks_freed": sum(s.blocks_freed for s in stats) / len(stats),
        "ms_per_pass": 1000 * sum(s.compaction_s for s in stats) / passes if passes else None,
        "whole_blocks": sum(s.whole_blocks for s in stats) / len(stats),
        "kv_spill": split_spill(policy)[1],
        "kv_bytes_host": sum(s.host_bytes for s in stats) / len(stats),
        "samples": len(probes), "prompt_tokens": sum(len(p["ids"]) for p in probes) / len(probes), "seconds": secs,
    }


def _line(c: dict) -> str:
    acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2f}"
    return (f"{c['policy']:>12} {c['task']:>10} {c['setting']:>18} L={c['length']} B={c['budget_tokens']}: acc {acc} agree {c['token_agreement']:.3f} "
            f"peak {c['kv_bytes_peak'] / 2**20:.1f} MiB steady {c['kv_bytes_steady'] / 2**20:.1f} MiB freed {c['blocks_freed']:.0f} ({c['seconds']:.0f} s)")


def _print_table(cells: list[dict]) -> None:
    print(f"{'length':>6} {'budget':>6} {'policy':>12} {'task':>10} {'setting':>18} {'acc':>5} {'agree':>6} {'peak MiB':>8} {'steady MiB':>10} {'freed':>6} {'ms/pass':>7}")
    for c in cells:
        if "error" in c:
            print(f"{c['length']:>6} {c['budget_tokens']:>6} {c['policy']:>12} {c['task']:>10} {c['setting']:>18}  refused: {c['error'][:60]}")
            continue
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2f}"
        ms = "-" if c["ms_per_pass"] is None else f"{c['ms_per_pass']:.0f}"
        print(f"{c['length']:>6} {c['budget_tokens'] or 'full':>6} {c['policy']:>12} {c['task']:>10} {c['setting']:>18} {acc:>5} {c['token_agreement']:6.3f} "
              f"{c['kv_bytes_peak'] / 2**20:8.1f} {c['kv_bytes_steady'] / 2**20:10.1f} {c['blocks_freed']:6.0f} {ms:>7}")


if __name__ == "__main__":
    sys.exit(main())
