"""Causal (activation) patching of attention heads on a retrieval probe, and FA-head selection.

A probe is a batch of clean prompts and corrupted twins that differ only in the value to be
retrieved. For every head (a KV group with its query heads, the unit GQA shares a cache for) we
copy its output at the answer positions from the clean run into the corrupted run and measure how
much of the clean-vs-corrupt logit difference of the answer comes back:

    restored = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt),  LD = sum over answer positions of
               logit[clean answer token] - logit[corrupt answer token]

An answer is one token (the first digit of a key, say) or a span: then both prompts end with the
clean answer's first tokens, teacher-forced, and every position that predicts an answer token is
scored. A span credits the heads that copy the rest of a value as well as those that find it.
1 means that head alone carries the retrieval, 0 that it does nothing for it. A head's output is
the input to the layer's ``o_proj`` (the slice of its query heads), so the same code patches the
project's model and transformers Llama-family models (``model.model.layers[i].self_attn.o_proj``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Probe:
    """Clean and corrupted prompts (N, T) and, per sample, the clean and the corrupted answer: a token (N,) or a span (N, k).

    With a span of k tokens, the prompts' last k positions are the ones that predict it: the prompts
    end with the clean answer's first k - 1 tokens. Positions where both answers agree score zero.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_answer: torch.Tensor
    corrupt_answer: torch.Tensor
    name: str = "probe"

    def __post_init__(self):
        if self.clean.dim() != 2 or self.clean.shape != self.corrupt.shape:
            raise ValueError(
                f"probe {self.name!r}: clean and corrupt prompts must be two (N, T) tensors of one shape; "
                f"got {tuple(self.clean.shape)} and {tuple(self.corrupt.shape)}"
            )
        n = self.clean.shape[0]
        if n == 0 or self.clean.shape[1] == 0:
            raise ValueError(f"probe {self.name!r} has no prompts")
        good, bad = self.clean_answer, self.corrupt_answer
        if good.dim() == 1 and bad.dim() == 1:
            good, bad = good[:, None], bad[:, None]
        if good.dim() != 2 or good.shape[0] != n or good.shape != bad.shape or not 0 < good.shape[1] <= self.clean.shape[1]:
            raise ValueError(
                f"probe {self.name!r} has no answer token for every prompt: expected answers of shape ({n},) or ({n}, k) "
                f"with k at most the prompt length, got {tuple(self.clean_answer.shape)} and {tuple(self.corrupt_answer.shape)}"
            )
        object.__setattr__(self, "clean_answer", good)  # always (N, k) from here on
        object.__setattr__(self, "corrupt_answer", bad)
        same = (good == bad).all(dim=1).nonzero().flatten().tolist()
        if same:
            raise ValueError(
                f"probe {self.name!r}: samples {same} have the same clean and corrupt answer token, "
                "so no logit difference can be measured; make the retrieved values differ in their first token"
            )


@dataclass(frozen=True)
class HeadScore:
    layer: int
    group: int  # KV group within the layer
    restored: float  # fraction of the clean logit difference this head's output brings back
    kind: str = "attn"  # "F" or "G" on the project's model, "attn" on other models


@dataclass
class PatchingResult:
    scores: list[HeadScore]  # best first
    clean_logit_diff: float
    corrupt_logit_diff: float
    num_layers: int
    num_groups: int
    meta: dict = field(default_factory=dict)


def _layout(model: nn.Module) -> tuple[list[nn.Module], int, int, int, list[str] | None]:
    """(o_proj of each layer, query heads, KV groups, head_dim, layer_heads or None) of a supported model."""
    config = model.config
    try:
        layers = [layer.self_attn.o_proj for layer in model.model.layers]
    except AttributeError as exc:
        raise TypeError(
            f"{type(model).__name__} is not a supported model: patching needs model.model.layers[i].self_attn.o_proj "
            "(the project's HydraHead model or a transformers Llama-family model)"
        ) from exc
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads, groups, head_dim, getattr(config, "layer_heads", None)


def _answer_runner(model: nn.Module, ids: torch.Tensor, k: int, cached: bool) -> Callable[[], torch.Tensor]:
    """A function giving the logits (N, k, vocab) of ``ids``' last k positions.

    Patching a head at the answer positions changes nothing before them, so with ``cached`` the
    prefix runs once and every patched run reads only the k answer positions against a copy of its
    cache: ~90 short runs instead of ~90 full ones on a 1k-token probe. Models that return no cache
    run whole.
    """
    if cached and ids.shape[1] > k:
        out = model(ids[:, :-k], use_cache=True)
        cache = getattr(out, "cache", None)  # HybridCache (FA K/V, GDN state, windows) or a transformers Cache
        if cache is not None and getattr(cache, "is_croppable", False):  # transformers: cut back to the prefix, no copy

            def run_and_crop() -> torch.Tensor:
                try:
                    return model(ids[:, -k:], cache=cache, use_cache=True).logits
                finally:
                    cache.crop(-k)  # drop the k answer positions again (a negative count: this transformers API)

            return run_and_crop
        if cache is not None:
            return lambda: model(ids[:, -k:], cache=copy.deepcopy(cache), use_cache=True).logits
        legacy = getattr(out, "past_key_values", None)  # transformers before `cache` replaced the name
        if legacy is not None:
            return lambda: model(ids[:, -k:], past_key_values=copy.deepcopy(legacy), use_cache=True).logits
    return lambda: model(ids).logits[:, -k:]


def _diff(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Per sample, the clean-minus-corrupt answer logit summed over the k answer positions; logits (N, k, vocab), good/bad (N, k)."""
    logits = logits.float()
    return (logits.gather(2, good[..., None]) - logits.gather(2, bad[..., None])).sum(dim=(1, 2))  # (N,)


@contextmanager
def _hooks(modules: list[nn.Module], hook_for) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Patcher:
    """A probe's clean head outputs and its corrupted runs, ready to score any set of heads patched clean together."""

    def __init__(self, model: nn.Module, probe: Probe, batch_size: int, cached: bool) -> None:
        self.layers, H, G, D, self.layer_heads = _layout(model)
        vocab = model.config.vocab_size
        for name, answers in (("clean", probe.clean_answer), ("corrupt", probe.corrupt_answer)):
            if int(answers.max()) >= vocab or int(answers.min()) < 0:
                raise ValueError(f"probe {probe.name!r}: a {name} answer token is outside the model's vocabulary of {vocab}")
        self.num_groups, self.width = G, (H // G) * D  # a group's query heads sit side by side in o_proj's input
        self.n, self.k = probe.clean.shape[0], probe.clean_answer.shape[1]
        self.probe_name = probe.name
        device = next(model.parameters()).device
        k = self.k
        self.batches = []  # per batch: (clean outputs per layer at the answer positions, corrupt runner, good, bad, LD corrupt)
        clean_total = corrupt_total = 0.0
        for start in range(0, self.n, batch_size):
            sl = slice(start, start + batch_size)
            good, bad = probe.clean_answer[sl].to(device), probe.corrupt_answer[sl].to(device)
            saved: list[torch.Tensor | None] = [None] * len(self.layers)

            def keep(i, saved=saved):
                def hook(_module, args):
                    saved[i] = args[0][:, -k:].clone()  # (b, k, H * D) every head's output at the answer positions

                return hook

            with _hooks(self.layers, keep):
                ld_clean = _diff(model(probe.clean[sl].to(device)).logits[:, -k:], good, bad)
            run = _answer_runner(model, probe.corrupt[sl].to(device), k, cached)
            ld_corrupt = _diff(run(), good, bad)
            clean_total += float(ld_clean.sum())
            corrupt_total += float(ld_corrupt.sum())
            self.batches.append((saved, run, good, bad, ld_corrupt))
        self.clean_ld, self.corrupt_ld = clean_total / self.n, corrupt_total / self.n
        self.gap = self.clean_ld - self.corrupt_ld
        if abs(self.gap) < 1e-6:
            raise ValueError(
                f"probe {probe.name!r}: the model scores the clean and corrupted prompts alike (logit difference gap {self.gap:.2e}), "
                "so no head can be credited; use a model that solves the probe or a probe it can solve"
            )

    def kind(self, layer: int, group: int) -> str:
        return self.layer_heads[layer][group] if self.layer_heads else "attn"

    def restored(self, heads: Sequence[tuple[int, int]]) -> float:
        """Share of the clean logit difference that comes back when these (layer, group) heads are patched clean together."""
        by_layer: dict[int, list[int]] = {}
        for layer, group in heads:
            by_layer.setdefault(layer, []).append(group)
        total = 0.0
        for saved, run, good, bad, ld_corrupt in self.batches:
            handles = []
            for layer, groups in by_layer.items():

                def swap(_module, args, layer=layer, groups=groups, saved=saved):
                    x = args[0].clone()
                    for g in groups:  # the cached run holds only the k answer positions
                        cols = slice(g * self.width, (g + 1) * self.width)
                        x[:, -self.k :, cols] = saved[layer][:, :, cols].to(x.dtype)
                    return (x, *args[1:])

                handles.append(self.layers[layer].register_forward_pre_hook(swap))
            try:
                total += float((_diff(run(), good, bad) - ld_corrupt).sum())
            finally:
                for h in handles:
                    h.remove()
        return total / self.n / self.gap

    def result(self, scores: list[HeadScore], **meta) -> PatchingResult:
        return PatchingResult(scores, self.clean_ld, self.corrupt_ld, len(self.layers), self.num_groups,
                              {"probe": self.probe_name, "samples": self.n, "answer_tokens": self.k, **meta})


@torch.no_grad()
def patch_heads(model: nn.Module, probe: Probe, batch_size: int = 8, cached: bool = True) -> PatchingResult:
    """Score every head of ``model`` by patching its output at the answer positions from clean into corrupt runs."""
    with _evaluating(model):
        patcher = _Patcher(model, probe, batch_size, cached)
        scores = [HeadScore(layer, group, patcher.restored([(layer, group)]), patcher.kind(layer, group))
                  for layer in range(len(patcher.layers)) for group in range(patcher.num_groups)]
    scores.sort(key=lambda s: (-s.restored, s.layer, s.group))
    return patcher.result(scores)


@torch.no_grad()
def greedy_heads(model: nn.Module, probe: Probe, budget: int, batch_size: int = 8, cached: bool = True,
                 progress: Callable[[int, int, float, tuple[int, int]], None] | None = None) -> PatchingResult:
    """Grow the set of heads that, patched clean together, restores the most of the answer.

    Patching one head at a time misses heads that only matter together (a copying head needs the
    heads that found the key; several heads can each carry part of it), and a hybrid keeps a *set*
    of heads exact. So: start empty, and ``budget`` times add the head whose joint patch with those
    already chosen restores the most. ``scores`` come back in the order chosen, each with the joint
    restoration after it was added (cumulative, not its own); the rest follow with their last gain.
    ``progress(round, budget, restored, (layer, group))`` is called after each round with the head it chose.
    """
    layers, _, groups, _, _ = _layout(model)
    total = len(layers) * groups
    if not 0 < budget <= total:
        raise ValueError(f"budget must be between 1 and the model's {total} heads; got {budget}")
    with _evaluating(model):
        patcher = _Patcher(model, probe, batch_size, cached)
        chosen: list[tuple[int, int]] = []
        order: list[HeadScore] = []
        last: dict[tuple[int, int], float] = {}
        for round_ in range(budget):
            for head in [(l, g) for l in range(len(patcher.layers)) for g in range(patcher.num_groups)]:
                if head not in chosen:
                    last[head] = patcher.restored([*chosen, head])
            best = max((h for h in last if h not in chosen), key=lambda h: last[h])  # the first best, in layer order
            chosen.append(best)
            order.append(HeadScore(*best, last[best], patcher.kind(*best)))
            if progress is not None:
                progress(round_ + 1, budget, last[best], best)
    rest = sorted((HeadScore(l, g, v, patcher.kind(l, g)) for (l, g), v in last.items() if (l, g) not in chosen),
                  key=lambda s: (-s.restored, s.layer, s.group))
    return patcher.result(order + rest, search="greedy", chosen=len(chosen))


PROSE_NEEDS_CORPUS = "--probe passkey-prose needs --corpus: the prose its pass keys hide in"


def build_probe(name: str, tokenizer, corpus: str | None, samples: int | None = None, length: int = 1024, filler: int = 6) -> Probe:
    """The probe ``--probe NAME`` asks for: "passkey" (4 prompts unless ``samples``) or "passkey-prose"
    (8, on ``corpus``'s training split); ValueError (or CorpusError) with the reason when it cannot be built."""
    from hydrabrain.inference.convert import read_texts

    if name == "passkey":
        return passkey_probe(tokenizer, samples=samples or 4, filler_repeats=filler)
    if name != "passkey-prose":
        raise ValueError(f"unknown probe {name!r}: use 'passkey' or 'passkey-prose'")
    if not corpus:
        raise ValueError(PROSE_NEEDS_CORPUS)
    return passkey_prose_probe(tokenizer, read_texts(corpus, "train"), length=length, samples=samples or 8)


def rank_heads(model: nn.Module, probe: Probe, search: str, budget: int,
               progress: Callable[[int, int, float, tuple[int, int]], None] | None = None) -> PatchingResult:
    """``search`` "single" (`patch_heads`: each head alone) or "greedy" (`greedy_heads`: a joint set of ``budget``)."""
    if search == "single":
        return patch_heads(model, probe)
    if search == "greedy":
        return greedy_heads(model, probe, budget, progress=progress)
    raise ValueError(f"unknown head search {search!r}: use 'single' or 'greedy'")


def select_heads(result: PatchingResult, ratio: float = 0.125, min_per_layer: int = 0) -> list[list[int]]:
    """FA groups per layer: the best-scoring ``ratio`` of all heads, with at least ``min_per_layer`` in each layer."""
    L, G = result.num_layers, result.num_groups
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of heads kept as full attention); got {ratio}")
    budget = round(ratio * L * G)
    if budget < 1:
        raise ValueError(f"ratio {ratio} of {L * G} heads keeps no head at all; raise it to at least {1 / (L * G):.4f}")
    if not 0 <= min_per_layer <= G:
        raise ValueError(f"min_per_layer must be between 0 and the {G} heads of a layer; got {min_per_layer}")
    if min_per_layer * L > budget:
        raise ValueError(
            f"ratio {ratio} gives {budget} FA heads, too few for {min_per_layer} in each of {L} layers; "
            f"raise the ratio to at least {min_per_layer * L / (L * G):.4f} or lower --min-per-layer"
        )
    chosen: list[list[int]] = [[] for _ in range(L)]
    for s in result.scores:  # best first: each layer's minimum goes to its own best heads
        if len(chosen[s.layer]) < min_per_layer:
            chosen[s.layer].append(s.group)
    left = budget - min_per_layer * L
    for s in result.scores:
        if left == 0:
            break
        if s.group not in chosen[s.layer]:
            chosen[s.layer].append(s.group)
            left -= 1
    return [sorted(groups) for groups in chosen]


def format_table(result: PatchingResult, selection: list[list[int]] | None = None, top: int | None = None) -> str:
    """The ranked heads as a text table; selected heads are starred."""
    rows = result.scores if top is None else result.scores[:top]
    lines = [f"{'rank':>4}  {'layer':>5}  {'group':>5}  {'kind':>4}  {'restored':>8}  FA", "-" * 40]
    for rank, s in enumerate(rows, 1):
        star = "*" if selection is not None and s.group in selection[s.layer] else ""
        lines.append(f"{rank:>4}  {s.layer:>5}  {s.group:>5}  {s.kind:>4}  {s.restored:>8.3f}  {star}")
    lines.append(
        f"clean logit diff {result.clean_logit_diff:.3f}, corrupt {result.corrupt_logit_diff:.3f}, "
        f"{result.num_layers} layers x {result.num_groups} heads"
    )
    return "\n".join(lines)


# --- the pass-key probe (tokenizer-based models) -------------------------------------------------

_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_probe(tokenizer, samples: int = 4, filler_repeats: int = 6, seed: int = 0) -> Probe:
    """A needle in filler text, completed as "The pass key is" (completion, not question: small models answer it).

    The clean and corrupted prompt carry different 5-digit keys whose first answer token differs
    and whose prompts tokenize to the same length.
    """
    rng = random.Random(seed)
    clean_rows, corrupt_rows, good, bad = [], [], [], []
    attempts = 0
    while len(clean_rows) < samples:
        attempts += 1
        if attempts > 50 * samples:
            raise ValueError(
                "could not build a pass-key probe with this tokenizer: no two keys gave prompts of one length and "
                "answers that differ in a token, so the probe has no answer token"
            )
        before = rng.randint(0, filler_repeats)
        keys = [str(rng.randint(10000, 99999)) for _ in range(2)]
        if keys[0][0] == keys[1][0]:
            continue
        prompts = [
            _FILLER * before
            + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + _FILLER * (filler_repeats - before)
            + "The pass key is"
            for key in keys
        ]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        answer = _answer_tokens(tokenizer, prompts, keys)
        if answer is None:
            continue
        shared, good_token, bad_token = answer
        rows = [r + shared for r in ids]  # tokens both keys start with (a lone space, say) join the prompt
        if len(rows[0]) != len(rows[1]) or (clean_rows and len(rows[0]) != len(clean_rows[0])):
            continue
        clean_rows.append(rows[0])
        corrupt_rows.append(rows[1])
        good.append(good_token)
        bad.append(bad_token)
    clean, corrupt = torch.tensor(clean_rows), torch.tensor(corrupt_rows)
    return Probe(clean, corrupt, torch.tensor(good), torch.tensor(bad), name="passkey")


def _answer_tokens(tokenizer, prompts: list[str], keys: list[str]) -> tuple[list[int], int, int] | None:
    """(continuation tokens both answers share, first clean token, first corrupt token) or None if none differ."""
    span = _answer_span(tokenizer, prompts, keys, same_length=False)
    return None if span is None else (span[0], span[1][0], span[2][0])


def passkey_prose_probe(tokenizer, texts: list[str], length: int = 1024, samples: int = 8, seed: int = 0) -> Probe:
    """The evaluation's pass key in ``length`` tokens of natural prose, every digit of the key scored.

    The single-token probe above credits the heads that start the key; a hybrid that keeps only
    those starts the number and then miscopies its digits. Here the clean and corrupted keys differ
    in every digit and both prompts end with the clean key but its last token, teacher-forced, so a
    head scores for each digit it helps copy. ``texts`` should not be the evaluation's own text:
    give the corpus's training split.
    """
    from hydrabrain.inference.evaluate import haystack, hide_at, needle_prompt

    rng = random.Random(seed)
    enough, chars = [], 0
    for text in texts:  # about 40 prompts' worth of prose is variety enough; a whole corpus would only cost tokenizing
        enough.append(text)
        chars += len(text)
        if chars > 40 * 4 * length:
            break
    filler, need = haystack(tokenizer, enough, length)
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    attempts = 0
    while len(rows) < samples:
        attempts += 1
        if attempts > 50 * samples:
            raise ValueError("could not build a pass-key probe with this tokenizer: no two keys tokenized alike in length")
        first = str(rng.randint(10000, 99999))
        second = "".join(rng.choice([d for d in "0123456789" if d != c and not (i == 0 and d == "0")]) for i, c in enumerate(first))
        before, after, _ = hide_at(tokenizer, filler, need, rng)
        prompts = [needle_prompt(before, after, key) for key in (first, second)]
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        answer = _answer_span(tokenizer, prompts, (first, second))
        if answer is None or len(ids[0]) != len(ids[1]):
            continue
        shared, good, bad = answer
        rows.append((ids[0] + shared + good[:-1], ids[1] + shared + good[:-1], good, bad))
    # every row the same length: drop leading prose (the needle sits at 10-90 % depth, well clear of it)
    width = min(len(r[0]) for r in rows)
    k = min(len(r[2]) for r in rows)
    if any(len(r[2]) != k for r in rows):
        raise ValueError("could not build a pass-key probe with this tokenizer: keys of one length tokenized to different lengths")
    clean = torch.tensor([r[0][len(r[0]) - width :] for r in rows])
    corrupt = torch.tensor([r[1][len(r[1]) - width :] for r in rows])
    return Probe(clean, corrupt, torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]), name="passkey-prose")


def _answer_span(tokenizer, prompts, keys, same_length: bool = True) -> tuple[list[int], list[int], list[int]] | None:
    """(tokens both answers start with, the clean answer's remaining tokens, the corrupted one's), or
    None if a key merges with its prompt, the answers never differ, or (``same_length``) they tokenize
    to different lengths."""
    conts = []
    for prompt, key in zip(prompts, keys):
        base = tokenizer.encode(prompt, add_special_tokens=False)
        full = tokenizer.encode(prompt + " " + key, add_special_tokens=False)
        if full[: len(base)] != base or len(full) == len(base):
            return None
        conts.append(full[len(base) :])
    if same_length and len(conts[0]) != len(conts[1]):
        return None
    shortest = min(map(len, conts))
    same = 0
    while same < shortest and conts[0][same] == conts[1][same]:
        same += 1
    if same == shortest:
        return None
    return conts[0][:same], conts[0][same:], conts[1][same:]
