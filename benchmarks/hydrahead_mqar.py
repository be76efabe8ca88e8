"""HydraHead's claim at small scale, from scratch on the CPU: multi-query associative recall (MQAR).

For each seed: train an all-attention model on MQAR; score its heads by causal patching on an
MQAR probe; then train, on the same batches for the same steps, an all-GDN model, a layer-wise
hybrid (1 FA layer in 4), a head-level hybrid with the best-patching head of every layer as FA
(1 in 8), the same with a random head per layer, and compare recall at the training length and
at 2x, 4x and 8x longer sequences with proportionally more key-value pairs. The anchor is the
layer-wise hybrid: every variant's accuracy and cache bytes are also given as a ratio to it.

    nice python benchmarks/hydrahead_mqar.py            # the committed run
    python benchmarks/hydrahead_mqar.py --quick         # a smoke run in about a minute

Writes benchmarks/results/hydrahead_mqar.json (one record per variant, seed and length) and
benchmarks/results/hydrahead_mqar.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hydrabrain.inference.model import HydraHeadConfig, HydraHeadForCausalLM
from hydrabrain.inference.patching import Probe, patch_heads, select_heads

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("all-FA", "all-GDN", "layer 1:3", "head 1:7 patched", "head 1:7 random")


@dataclass
class Task:
    """MQAR: ``pairs`` key-value pairs, then queries (a key, then its value to predict) up to ``length`` tokens."""

    num_keys: int = 64  # keys are tokens 1..num_keys
    num_values: int = 64  # values follow the keys in the vocabulary
    train_len: int = 64  # tokens per training sequence
    train_pairs: int = 8  # key-value pairs at the training length; scaled with the length at eval

    @property
    def vocab(self) -> int:
        return 1 + self.num_keys + self.num_values

    def batch(self, n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), both (n, length); labels are -100 except at the values of the queries."""
        pairs = self.pairs_at(length)
        keys, values = self._pairs(n, pairs, gen)
        context = torch.stack([keys, values], dim=2).reshape(n, 2 * pairs)  # (n, 2P): k v k v ...
        asked = torch.randint(0, pairs, (n, (length - 2 * pairs) // 2), generator=gen)  # (n, Q), with replacement
        queries = torch.stack([keys.gather(1, asked), values.gather(1, asked)], dim=2).reshape(n, -1)  # (n, 2Q)
        ids = torch.cat([context, queries], dim=1)  # (n, length)
        labels = torch.full_like(ids, -100)
        labels[:, 2 * pairs + 1 :: 2] = ids[:, 2 * pairs + 1 :: 2]
        return ids, labels

    def pairs_at(self, length: int) -> int:
        return max(1, self.train_pairs * length // self.train_len)

    def _pairs(self, n: int, pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if pairs > min(self.num_keys, self.num_values):
            raise ValueError(f"{pairs} pairs need at least that many distinct keys and values")
        keys = torch.argsort(torch.rand(n, self.num_keys, generator=gen), dim=1)[:, :pairs] + 1  # (n, P) distinct
        values = torch.argsort(torch.rand(n, self.num_values, generator=gen), dim=1)[:, :pairs] + 1 + self.num_keys
        return keys, values

    def probe(self, n: int, gen: torch.Generator) -> Probe:
        """Context, every other key asked once, then the last key; the corrupted twin gives it another value."""
        pairs = self.train_pairs
        keys, values = self._pairs(n, pairs, gen)
        context = torch.stack([keys, values], dim=2).reshape(n, 2 * pairs)
        order = torch.argsort(torch.rand(n, pairs, generator=gen), dim=1)  # (n, P); the last one is the probe
        queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).reshape(n, 2 * pairs)
        prompt = torch.cat([context, queries[:, :-1]], dim=1)  # (n, 4P - 1), ends on the probed key
        clean_answer = queries[:, -1]
        slot = order[:, -1] * 2 + 1  # where the probed key's value sits in the context
        replacement = (clean_answer - 1 - self.num_keys + 1) % self.num_values + 1 + self.num_keys  # the next value up
        keep = ~(values == replacement[:, None]).any(1)  # drop rows where another pair already has that value
        corrupt = prompt.clone()
        corrupt[torch.arange(n), slot] = replacement
        return Probe(prompt[keep], corrupt[keep], clean_answer[keep], replacement[keep], name="mqar")


def make_config(args, task: Task, layer_heads: list[str]) -> HydraHeadConfig:
    return HydraHeadConfig(
        vocab_size=task.vocab,
        hidden_size=args.d_model,
        intermediate_size=2 * args.d_model,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        layer_heads=layer_heads,
        max_position_embeddings=args.train_len * 8,
        tie_word_embeddings=True,
        fa_conv=args.fa_conv,
    )


def train(config: HydraHeadConfig, task: Task, args, seed: int) -> tuple[HydraHeadForCausalLM, float]:
    torch.manual_seed(seed)
    model = HydraHeadForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every variant of a seed
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.steps):
        ids, labels = task.batch(args.batch, args.train_len, gen)
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval(), float(loss.detach())


@torch.no_grad()
def accuracy(model: HydraHeadForCausalLM, task: Task, length: int, samples: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(20_000 + seed * 100 + length)
    correct = total = 0
    for start in range(0, samples, 32):
        ids, labels = task.batch(min(32, samples - start), length, gen)
        pred = model(ids).logits[:, :-1].argmax(-1)  # (n, T-1) prediction of token t+1
        target = labels[:, 1:]
        mask = target != -100
        correct += int((pred[mask] == target[mask]).sum())
        total += int(mask.sum())
    return correct / total


def layouts(args, selection: list[list[int]], seed: int) -> dict[str, list[str]]:
    L, H = args.layers, args.heads
    rng = random.Random(1000 + seed)
    fa_layer = L - 1 if args.fa_layer is None else args.fa_layer
    return {
        "all-FA": ["F" * H] * L,
        "all-GDN": ["G" * H] * L,
        # 1 layer in 4 keeps attention (the layer-wise hybrids' usual 3:1)
        "layer 1:3": ["F" * H if (i % 4 == fa_layer % 4) else "G" * H for i in range(L)],
        "head 1:7 patched": HydraHeadConfig.layer_heads_from(selection, H),
        "head 1:7 random": HydraHeadConfig.layer_heads_from([[rng.randrange(H)] for _ in range(L)], H),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--fa-layer", type=int, default=None, help="which layer keeps attention in the layer-wise hybrid (default: the last)")
    parser.add_argument("--train-len", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs at the training length (scaled with the length at eval)")
    parser.add_argument("--keys", type=int, default=64, help="distinct keys (and values) in the vocabulary; at least the pairs at the longest length")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--probe-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a shared 2-core machine")
    parser.add_argument("--no-fa-conv", dest="fa_conv", action="store_false",
                        help="plain FA heads without the short convolution (learns recall far more slowly)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--out", default=str(RESULTS / "hydrahead_mqar.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine runs made with one seed each (in parallel) into --out, its table and its plot")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.quick:
        args.seeds, args.steps, args.eval_samples, args.scales, args.probe_samples = [0], 30, 32, [1, 2], 8
    torch.set_num_threads(args.threads)
    task = Task(num_keys=args.keys, num_values=args.keys, train_len=args.train_len, train_pairs=args.pairs)
    records, selections, params, started = [], [], {}, time.time()
    for seed in args.seeds:
        trained: dict[str, HydraHeadForCausalLM] = {}
        t0 = time.time()
        trained["all-FA"], loss = train(make_config(args, task, ["F" * args.heads] * args.layers), task, args, seed)
        print(f"seed {seed}: all-FA trained in {time.time() - t0:.0f}s (final loss {loss:.3f})", file=sys.stderr, flush=True)
        probe = task.probe(args.probe_samples, torch.Generator().manual_seed(30_000 + seed))
        patched = patch_heads(trained["all-FA"], probe)
        selection = select_heads(patched, ratio=1 / args.heads, min_per_layer=1)
        selections.append(
            {"seed": seed, "fa_heads": selection, "scores": [asdict(s) for s in patched.scores],
             "clean_logit_diff": patched.clean_logit_diff, "corrupt_logit_diff": patched.corrupt_logit_diff}
        )
        for variant, heads in layouts(args, selection, seed).items():
            config = make_config(args, task, heads)
            if variant not in trained:
                t0 = time.time()
                trained[variant], loss = train(config, task, args, seed)
                print(f"seed {seed}: {variant} trained in {time.time() - t0:.0f}s (final loss {loss:.3f})", file=sys.stderr, flush=True)
            model = trained[variant]
            params[variant] = sum(p.numel() for p in model.parameters())
            for scale in args.scales:
                length = args.train_len * scale
                acc = accuracy(model, task, length, args.eval_samples, seed)
                records.append({
                    "variant": variant, "seed": seed, "length": length, "pairs": task.pairs_at(length), "accuracy": acc,
                    "kv_bytes_per_token": config.cache_bytes(length) / length, "layer_heads": heads,
                    "parameters": params[variant], "final_train_loss": loss if variant != "all-FA" else None,
                })
        print(f"seed {seed} done at {time.time() - started:.0f}s", file=sys.stderr, flush=True)
        # written after every seed, so a run cut short still leaves its finished seeds behind
        save(args, argv, records, selections, params, time.time() - started)

    print(summarise(records, args))
    plot(records, args, Path(args.out).with_suffix(".png"))
    return 0


def save(args, argv, records, selections, params, wall) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/hydrahead_mqar.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": params,
        "wall_seconds": round(wall, 1),
        "records": records,
        "selections": selections,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)


def merge(paths: list[str], out: Path) -> int:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    config = dict(runs[0]["config"])
    for run in runs[1:]:
        differing = {k for k, v in run["config"].items() if k not in ("seeds", "merge") and config.get(k) != v}
        if differing:
            raise SystemExit(f"cannot merge runs whose settings differ in {sorted(differing)}")
    records = [r for run in runs for r in run["records"]]
    config["seeds"] = sorted({r["seed"] for r in records})  # the seeds that finished, not the ones asked for
    payload = {
        "command": [run["command"] for run in runs],
        "config": config,
        "parameters": runs[0]["parameters"],
        "wall_seconds": [run["wall_seconds"] for run in runs],
        "records": records,
        "selections": [s for run in runs for s in run["selections"]],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    args = argparse.Namespace(**config)
    print(summarise(records, args))
    plot(records, args, out.with_suffix(".png"))
    return 0


def _mean(xs):
    return sum(xs) / len(xs)


def summarise(records, args) -> str:
    lengths = [args.train_len * s for s in args.scales]
    anchor = {
        n: _mean([r["accuracy"] for r in records if r["variant"] == "layer 1:3" and r["length"] == n]) for n in lengths
    }
    head = f"{'variant':<18}" + "".join(f"{'acc@' + str(n):>21}" for n in lengths) + f"{'B/token@' + str(lengths[-1]):>14}{'x anchor':>9}"
    lines = [head, "-" * len(head)]
    anchor_bytes = _mean([r["kv_bytes_per_token"] for r in records if r["variant"] == "layer 1:3" and r["length"] == lengths[-1]])
    for v in VARIANTS:
        cells = []
        for n in lengths:
            accs = [r["accuracy"] for r in records if r["variant"] == v and r["length"] == n]
            ratio = _mean(accs) / anchor[n] if anchor[n] else float("nan")
            cells.append(f"{_mean(accs):.3f}±{(max(accs) - min(accs)) / 2:.3f} ({ratio:.2f})")
        b = _mean([r["kv_bytes_per_token"] for r in records if r["variant"] == v and r["length"] == lengths[-1]])
        lines.append(f"{v:<18}" + "".join(f"{c:>21}" for c in cells) + f"{b:>14.0f}{b / anchor_bytes:>9.2f}")
    lines.append("accuracy: mean ± half-range over seeds (ratio to the layer-wise 1:3 anchor); bytes: FA K/V + GDN state + conv state, fp32")
    return "\n".join(lines)


def plot(records, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = [args.train_len * s for s in args.scales]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in VARIANTS:
        means = [_mean([r["accuracy"] for r in records if r["variant"] == v and r["length"] == n]) for n in lengths]
        lows = [min(r["accuracy"] for r in records if r["variant"] == v and r["length"] == n) for n in lengths]
        highs = [max(r["accuracy"] for r in records if r["variant"] == v and r["length"] == n) for n in lengths]
        ax.plot(lengths, means, marker="o", label=v)
        ax.fill_between(lengths, lows, highs, alpha=0.15)
        kv = [_mean([r["kv_bytes_per_token"] for r in records if r["variant"] == v and r["length"] == n]) for n in lengths]
        bx.plot(lengths, kv, marker="o", label=v)
    ax.set(xscale="log", xlabel="sequence length (key-value pairs grow with it)", ylabel="MQAR recall accuracy",
           title=f"recall vs length (trained at {args.train_len}; {len(args.seeds)} seeds, band = min..max)")
    pairs = sorted({(r["length"], r["pairs"]) for r in records})
    ax.plot([n for n, _ in pairs], [1 / p for _, p in pairs], "k--", lw=1, label="guessing a value of the context")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    bx.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="cache bytes per token (fp32)", title="KV + recurrent state per token")
    bx.set_xticks(lengths, [str(n) for n in lengths])
    for axis in (ax, bx):
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
