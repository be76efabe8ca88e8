"""HydraHead on a pretrained model: SmolLM2-135M converted at 7:1 with heads chosen by patching, at random, or by whole layers.

Every variant keeps the same number of KV groups as full attention (``--ratio`` of 90) and gets the
same token budget: one stage-1 bank (attention transfer of all 90 heads to GDN on the teacher's
hidden states; a head's stage-1 target does not depend on the others, so every variant takes its
GDN heads from it) and then its own stage-2 distillation on the teacher's logits. Each variant,
and the teacher, is scored on held-out perplexity, pass-key retrieval in held-out prose at each
length, cache bytes and decode speed through the paged engine.

    nice python benchmarks/hydrahead_smollm2.py --corpus PATH/peps.jsonl.xz          # the committed run
    python benchmarks/hydrahead_smollm2.py --corpus PATH/peps.jsonl.xz --quick       # a smoke run

Writes benchmarks/results/hydrahead_smollm2.json after every variant (a list, one object per
variant and selection seed), so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hydrabrain.inference import evaluate, models  # noqa: E402
from hydrabrain.inference.convert import ConvertConfig, convert, head_budget, layerwise_heads, random_heads, read_texts  # noqa: E402
from hydrabrain.inference.model import HydraHeadForCausalLM  # noqa: E402
from hydrabrain.inference.patching import build_probe, rank_heads, select_heads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def score(name: str, model, tokenizer, heldout: list[str], prompts: dict[int, list], args) -> dict:
    started = time.perf_counter()
    model.eval()
    ppl = evaluate.heldout_perplexity(model, tokenizer, heldout, tokens=args.ppl_tokens, seq_len=args.seq_len)
    passkey = {}
    for length, batch in prompts.items():
        passkey[str(length)] = evaluate.passkey_accuracy(model, batch)
        log(f"{name}: pass key at {length}: {passkey[str(length)]:.2f}")
    per_token, state = evaluate.cache_bytes(model.config)
    speed = {str(b): round(evaluate.decode_tokens_per_s(model, tokenizer, b), 1) for b in args.decode_batches}
    log(f"{name}: ppl {ppl:.2f}, pass key {passkey}, KV {per_token} B/token, state {state} B, decode {speed} tok/s")
    return {"heldout_ppl": round(ppl, 3), "passkey": passkey, "kv_bytes_per_token": per_token, "state_bytes": state,
            "decode_tok_s": speed, "eval_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="JSONL corpus with a 'heldout' split (the team uses peps.jsonl.xz)")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.125, help="fraction of KV groups kept FA (default 0.125: 11 of 90)")
    parser.add_argument("--stage1-tokens", type=int, default=131072)
    parser.add_argument("--stage2-tokens", type=int, default=24576)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per stage-1 row and per perplexity window")
    parser.add_argument("--stage1-seq-len", type=int, default=None,
                        help="tokens per stage-1 row of the bank, if not --seq-len (a step reads the same tokens: fewer rows)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--distill-seq-len", type=int, default=None, help="tokens per stage-2 row (default --seq-len)")
    parser.add_argument("--distill-batch", type=int, default=None, help="rows per stage-2 step (default: the tokens of a stage-1 step)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-distill", type=float, default=3e-4)
    parser.add_argument("--distill-train", choices=("gdn", "all"), default="gdn", help="stage 2 trains the GDN heads and fusion, or every layer's weights")
    parser.add_argument("--distill-far-copy", type=float, default=0.0, metavar="W",
                        help="stage 2 weighs positions whose next token was last seen beyond the GDN window 1 + W times (default 0)")
    parser.add_argument("--distill-plant-copies", type=int, default=0, metavar="N",
                        help="stage 2 plants N long-range copies of a span per row, weighted as far copies (default 0)")
    parser.add_argument("--samples", type=int, default=20, help="pass-key prompts per length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variants", nargs="+", default=["teacher", "patching", "random", "layerwise", "all-gdn"],
                        help="which to run, in this order (random runs its first seed here and the others at the end)")
    parser.add_argument("--gdn-window", type=int, default=0, metavar="N",
                        help="GDN heads also keep softmax over --gdn-sinks sinks and the last N tokens (default 0: pure GDN)")
    parser.add_argument("--gdn-sinks", type=int, default=4)
    parser.add_argument("--probe", choices=("passkey", "passkey-prose"), default="passkey",
                        help="the probe patching ranks heads on: the short synthetic one (first key token) or keys in the corpus's training prose, every digit scored")
    parser.add_argument("--probe-length", type=int, default=1024, help="passkey-prose prompt length (default 1024)")
    parser.add_argument("--search", choices=("single", "greedy"), default="single", help="patching each head alone, or a greedily grown joint set")
    parser.add_argument("--heads-file", default=None, help="take the patching variant's FA heads from `hydrabrain model heads --out FILE` instead of ranking here")
    parser.add_argument("--work", default=None, help="where converted models are kept (default .bench/hydrahead_smollm2[_windowN])")
    parser.add_argument("--out", default=None, help="default benchmarks/results/hydrahead_smollm2[_windowN].json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny budgets and short prompts: a smoke run")
    parser.add_argument("--table", action="store_true", help="print the table of an earlier run's --out file and exit")
    args = parser.parse_args(argv)
    suffix = f"_window{args.gdn_window}" if args.gdn_window else ""
    args.work = args.work or str(ROOT / ".bench" / f"hydrahead_smollm2{suffix}")
    args.out = args.out or str(RESULTS / f"hydrahead_smollm2{suffix}.json")
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["rows"]))  # rows of every command that wrote the file
        return 0
    if args.quick:
        args.stage1_tokens, args.stage2_tokens, args.seq_len, args.batch = 1024, 1024, 256, 2
        args.samples, args.lengths, args.ppl_tokens, args.random_seeds, args.decode_batches = 2, [512], 1024, [0], [1]
    args.stage1_seq_len = args.stage1_seq_len or args.seq_len
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/hydrahead_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:])

    heldout = read_texts(args.corpus, "heldout")
    teacher, tokenizer = models.load(args.teacher)
    L, G = teacher.config.num_hidden_layers, teacher.config.num_key_value_heads
    budget = head_budget(L, G, args.ratio)
    # the prompts come from one half of the held-out split and perplexity from the other
    prompts = {n: evaluate.passkey_prompts(tokenizer, heldout[::2], n, args.samples, seed=n) for n in args.lengths}
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "device": _device(args.device), "ratio": args.ratio, "fa_groups_budget": budget,
                   "probe": args.probe, "search": args.search, "distill_train": args.distill_train, "distill_far_copy": args.distill_far_copy, "distill_plant_copies": args.distill_plant_copies, "heads_file": args.heads_file, "gdn_window": args.gdn_window, "gdn_sinks": args.gdn_sinks if args.gdn_window else None,
                   "stage1_tokens": args.stage1_tokens, "stage1_seq_len": args.stage1_seq_len, "stage2_tokens": args.stage2_tokens, "rows": rows}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out)

    def base_cfg(fa, selection, seed=None, **kw) -> ConvertConfig:
        settings = dict(stage1_tokens=args.stage1_tokens, stage2_tokens=args.stage2_tokens, seq_len=args.seq_len,
                        batch=args.batch, distill_seq_len=args.distill_seq_len, distill_batch=args.distill_batch, lr=args.lr, lr_distill=args.lr_distill, distill_train=args.distill_train, distill_far_copy=args.distill_far_copy, distill_plant_copies=args.distill_plant_copies, device=args.device,
                        gdn_window=args.gdn_window, gdn_sinks=args.gdn_sinks)
        return ConvertConfig(fa_heads=fa, selection=selection, selection_seed=seed, **{**settings, **kw})

    log(f"teacher {args.teacher}: {L} layers x {G} KV groups; {budget} kept FA")
    bank = work / "stage1-bank"
    if not (bank / "conversion.json").exists():
        log(f"stage 1 bank: every head to GDN, {args.stage1_tokens} tokens in rows of {args.stage1_seq_len}")
        cfg = base_cfg([[] for _ in range(L)], "all-gdn-stage1", stage2_tokens=0, seq_len=args.stage1_seq_len,
                       batch=max(1, args.batch * args.seq_len // args.stage1_seq_len))
        convert(teacher, tokenizer, args.corpus, bank, cfg, resume=True, progress=_progress(), teacher_name=args.teacher)

    selections: list[tuple[str, int | None, list[list[int]]]] = []
    for variant in args.variants:
        if variant == "patching" and args.heads_file:
            saved = json.loads(Path(args.heads_file).read_text())
            log(f"patching: FA heads from {args.heads_file} (probe {saved.get('probe')}, search {saved.get('search', 'single')})")
            selections.append(("patching", None, [sorted(g) for g in saved["fa_heads"]]))
        elif variant == "patching":
            probe = build_probe(args.probe, tokenizer, args.corpus, length=args.probe_length)
            result = rank_heads(teacher, probe, args.search, budget, progress=lambda d, t, r, h: log(f"greedy search: {d}/{t} heads (layer {h[0]} group {h[1]}), joint restoration {r:.3f}"))
            selections.append(("patching", None, select_heads(result, ratio=args.ratio)))
        elif variant == "random":
            selections.append(("random", args.random_seeds[0], random_heads(L, G, budget, args.random_seeds[0])))
        elif variant == "layerwise":
            selections.append(("layerwise", None, layerwise_heads(L, G, budget)))
        elif variant == "all-gdn":
            selections.append(("all-gdn", None, [[] for _ in range(L)]))
        elif variant == "teacher":
            selections.append(("teacher", None, [list(range(G)) for _ in range(L)]))
    if "random" in args.variants:
        selections += [("random", s, random_heads(L, G, budget, s)) for s in args.random_seeds[1:]]

    for variant, seed, fa in selections:
        name = variant if seed is None else f"{variant}-{seed}"
        if variant == "teacher":
            row = {"variant": "teacher", "selection_seed": None, "fa_groups": L * G, "tokens": 0, **score(name, teacher, tokenizer, heldout[1::2], prompts, args)}
            record(row)
            continue
        folder = work / name
        log(f"{name}: FA groups {fa}")
        if (folder / "conversion.json").exists():
            student = HydraHeadForCausalLM.from_pretrained(folder, dtype=torch.float32)
            report = json.loads((folder / "conversion.json").read_text())
        else:
            cfg = base_cfg(fa, variant, seed, stage1_from=str(bank))
            student, report = convert(teacher, tokenizer, args.corpus, folder, cfg, resume=True, progress=_progress(), teacher_name=args.teacher)
        measured = score(name, student, tokenizer, heldout[1::2], prompts, args)
        report["evaluation"] = measured
        (folder / "conversion.json").write_text(json.dumps(report, indent=1))
        record({"variant": variant, "selection_seed": seed, "gdn_window": args.gdn_window, "fa_groups": sum(len(g) for g in fa), "fa_heads": fa,
                "tokens": report["tokens"]["stage1"] + report["tokens"]["stage2"], "tokens_by_stage": report["tokens"],
                "losses": report["losses"], "convert_s": report["wall_s"], **measured})
    print(table(rows))
    log(f"wrote {out}")
    return 0


def table(rows: list[dict]) -> str:
    """A markdown table, one line per variant and selection seed."""
    lengths = sorted({int(n) for r in rows for n in r["passkey"]})
    head = ["variant", "seed", "GDN window", "FA groups", "tokens (stage 1 + 2)", "held-out ppl"] + [f"pass key {n}" for n in lengths]
    head += ["KV bytes/token", "state bytes", "decode tok/s b1", "decode tok/s b8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tokens = r.get("tokens_by_stage") or {"stage1": 0, "stage2": 0}
        window = "" if r["variant"] == "teacher" else str(r.get("gdn_window") or "none")
        cells = [r["variant"], "" if r["selection_seed"] is None else str(r["selection_seed"]), window, str(r["fa_groups"]),
                 f"{tokens['stage1']} + {tokens['stage2']}", f"{r['heldout_ppl']:.2f}"]
        cells += [f"{r['passkey'][str(n)]:.2f}" if str(n) in r["passkey"] else "" for n in lengths]
        cells += [str(r["kv_bytes_per_token"]), str(r["state_bytes"])] + [str(r["decode_tok_s"].get(b, "")) for b in ("1", "8")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _progress():
    last = [0.0]

    def show(stage, done, total, rate, losses):
        now = time.perf_counter()
        if now - last[0] > 30 or done >= total:
            last[0] = now
            log(f"  {stage}: {done}/{total} tokens, {rate:.0f} tok/s, loss {next(iter(losses.values())):.4f}")

    return show


def _device(device: str) -> str:
    from hydrabrain.inference.convert import describe_device

    return describe_device(device)


if __name__ == "__main__":
    sys.exit(main())
