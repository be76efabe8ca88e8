"""Convert a pretrained Llama-family model into a HydraHead hybrid: attention transfer, then distillation.

The recipe (after LoLCATs and RADLADS), with the teacher frozen throughout:

1. Attention transfer. ``from_llama`` copies every weight; FA heads are then the teacher's own and
   every GDN head starts from the q/k/v of the softmax head it replaces. Each GDN head learns to
   reproduce that head's output (the slice of o_proj's input) on the teacher's own hidden states:
   one teacher forward gives every layer's input, so all layers train at once and independently.
   The loss is the mean squared error relative to the teacher head's mean square.
2. Distillation. The whole student runs on the same text and learns the teacher's next-token
   distribution (KL(teacher || student), every position). By default only GDN and fusion parameters
   train (the GDN heads' rows of q/k/v, convolution, decay, beta, norm, gate and gain); FA heads, MLPs,
   embeddings and norms stay the teacher's. ``distill_train="all"`` also trains every layer's own
   weights (FA heads whole; MLPs and norms at a tenth of the rate); embeddings stay frozen.

Because a GDN head's stage-1 target and inputs do not depend on which other heads are GDN, heads
trained in stage 1 by one conversion can seed another (``stage1_from``): an all-GDN stage 1 is a
bank every selection draws from at the same token cost.

``convert`` is the library entry point; ``hydrabrain model convert`` is its command line.
"""

from __future__ import annotations

import json
import lzma
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hydrabrain.inference.model import HydraAttention, HydraHeadForCausalLM, from_llama

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")


class CorpusError(ValueError):
    """The corpus is missing, unreadable, or holds no text for the asked split."""


# --- the corpus -----------------------------------------------------------------------------------


def _open_text(path: Path):
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else path.open(encoding="utf-8")


def _kind(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".xz") else path.name
    for suffix in TEXT_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def corpus_files(path: str | Path) -> list[Path]:
    """The text files a corpus path names: one file, or every text file under a folder, sorted."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus {str(path)!r} does not exist: give a text, markdown or JSONL file (plain or .xz) or a folder of them")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and _kind(p))
    if root.is_file() and not _kind(root):
        raise CorpusError(f"corpus {str(path)!r} is not a {', '.join(TEXT_SUFFIXES)} file (plain or .xz)")
    if not files:
        raise CorpusError(f"corpus folder {str(path)!r} holds no {', '.join(TEXT_SUFFIXES)} files (plain or .xz)")
    return files


def read_texts(path: str | Path, split: str = "train") -> list[str]:
    """Documents of one split. JSONL rows carry ``text`` and maybe ``split``; other files are train text.

    Rows marked ``"split": "heldout"`` are returned only for ``split="heldout"``, so they are never
    trained on; plain text and markdown files have no held-out part.
    """
    texts = []
    for file in corpus_files(path):
        if _kind(file) == ".jsonl":
            with _open_text(file) as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{file}:{number} is not valid JSON ({exc.msg})") from exc
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise CorpusError(f"{file}:{number} has no string 'text' field")
                    row_split = "heldout" if row.get("split") == "heldout" else "train"
                    if row_split == split and row["text"].strip():
                        texts.append(row["text"])
        elif split == "train":
            with _open_text(file) as fh:
                text = fh.read()
            if text.strip():
                texts.append(text)
    if not texts:
        raise CorpusError(f"corpus {str(path)!r} holds no {split} text" + (" (only JSONL rows marked \"split\": \"heldout\" count)" if split == "heldout" else ""))
    return texts


class TokenBatches:
    """Endless (batch, seq_len) token batches: documents shuffled by seed, joined with EOS, cut in rows."""

    def __init__(self, texts: list[str], tokenizer, batch: int, seq_len: int, seed: int = 0) -> None:
        self.texts, self.tokenizer, self.batch, self.seq_len = texts, tokenizer, batch, seq_len
        self.rng = random.Random(seed)
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.buffer: list[int] = []
        self.order: list[int] = []
        self.taken = 0  # tokens handed out, so a resumed run can skip them whatever the rows' shape was

    def _refill(self) -> None:
        if not self.order:
            self.order = list(range(len(self.texts)))
            self.rng.shuffle(self.order)
        text = self.texts[self.order.pop()]
        self.buffer.extend(self.tokenizer.encode(text, add_special_tokens=False))
        self.buffer.append(self.eos)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        need = self.batch * self.seq_len
        while len(self.buffer) < need:
            self._refill()
        rows, self.buffer = self.buffer[:need], self.buffer[need:]
        self.taken += need
        return torch.tensor(rows).view(self.batch, self.seq_len)  # (B, T)

    def skip_tokens(self, tokens: int) -> None:
        """Drop the next ``tokens`` tokens of the stream: rows are cut from it in order, so this lands where a
        run that handed out that many tokens, in rows of any shape, left off."""
        while len(self.buffer) < tokens:
            self._refill()
        self.buffer = self.buffer[tokens:]
        self.taken += tokens


# --- head selection -------------------------------------------------------------------------------


def random_heads(num_layers: int, num_groups: int, budget: int, seed: int) -> list[list[int]]:
    """``budget`` KV groups drawn uniformly from the whole model."""
    picks = random.Random(seed).sample([(layer, g) for layer in range(num_layers) for g in range(num_groups)], budget)
    return [sorted(g for layer, g in picks if layer == i) for i in range(num_layers)]


def layerwise_heads(num_layers: int, num_groups: int, budget: int) -> list[list[int]]:
    """Whole layers kept FA, evenly spaced, ``budget`` groups in all (a remainder fills one more layer)."""
    full, rest = divmod(budget, num_groups)
    count = full + (1 if rest else 0)
    layers = [round((i + 0.5) * num_layers / count - 0.5) for i in range(count)]
    out: list[list[int]] = [[] for _ in range(num_layers)]
    for n, layer in enumerate(layers):
        out[layer] = list(range(num_groups if n < full else rest))
    return out


def head_budget(num_layers: int, num_groups: int, ratio: float) -> int:
    budget = round(ratio * num_layers * num_groups)
    if not 0 < ratio <= 1 or budget < 1:
        raise ValueError(
            f"ratio {ratio} keeps no head as full attention (of {num_layers * num_groups}); "
            f"give a ratio in [{1 / (num_layers * num_groups):.4f}, 1]"
        )
    return budget


# --- which parameters train, and how a GDN head's slices are found ---------------------------------


def gdn_rows(attn: HydraAttention, group: int) -> dict[str, torch.Tensor]:
    """Row indices (dim 0) of each parameter that belongs to one GDN group of ``attn``."""
    D, rep = attn.config.head_dim, attn.rep
    j = attn.gdn_groups.index(group)  # position among the layer's GDN groups
    Hg, Gg = len(attn.gdn_queries), len(attn.gdn_groups)

    def span(start: int, width: int) -> torch.Tensor:
        return torch.arange(start, start + width)

    queries = span(group * rep * D, rep * D)  # the group's query heads in q_proj
    local_q = span(j * rep * D, rep * D)  # and among the GDN query heads
    return {
        "q_proj.weight": queries,
        "k_proj.weight": span(group * D, D),
        "v_proj.weight": span(group * D, D),
        "conv_weight": torch.cat([local_q, span(Hg * D + j * D, D), span(Hg * D + Gg * D + j * D, D)]),
        "a_proj.weight": span(j, 1),
        "b_proj.weight": span(j, 1),
        "A_log": span(j, 1),
        "dt_bias": span(j, 1),
        "head_gain": span(group * rep, rep),
        "gdn_gate_proj.weight": local_q,
    }


PER_LAYER_GDN = ("gdn_norm.weight",)  # shared by a layer's GDN heads


DISTILL_TRAIN = ("gdn", "all")


def trainable_parameters(student: HydraHeadForCausalLM, everything: bool = False) -> list[dict]:
    """AdamW parameter groups: the GDN heads and their fusion (``lr_scale`` 1), the rest frozen.

    By default the FA rows of q/k/v get their gradient zeroed, so the kept heads stay the teacher's.
    With ``everything`` (stage 2 of ``distill_train="all"``) every layer's attention trains whole,
    FA heads included, and its MLPs and norms train too, in a second group (``lr_scale`` 0.1 of the
    stage's rate): the teacher's own weights may then move to work around what the GDN heads
    approximate. Embeddings and the output head stay frozen.
    """
    for handle in getattr(student, "_fa_grad_masks", []):
        handle.remove()
    masks: list = []
    student._fa_grad_masks = masks
    for p in student.parameters():
        p.requires_grad_(False)
    if everything:
        attention = [p for layer in student.model.layers for p in layer.self_attn.parameters()]
        seen = {id(p) for p in attention}
        rest = [p for layer in student.model.layers for p in layer.parameters() if id(p) not in seen] + list(student.model.norm.parameters())
        for p in attention + rest:
            p.requires_grad_(True)
        return [{"params": attention, "lr_scale": 1.0}, {"params": rest, "lr_scale": 0.1}]
    params = []
    for layer in student.model.layers:
        attn = layer.self_attn
        if not attn.gdn_groups:
            continue
        keep: dict[str, list[torch.Tensor]] = {}
        for g in attn.gdn_groups:
            for name, rows in gdn_rows(attn, g).items():
                keep.setdefault(name, []).append(rows)
        for name, param in attn.named_parameters():
            if name not in keep and name not in PER_LAYER_GDN:
                continue
            param.requires_grad_(True)
            params.append(param)
            if name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "head_gain"):
                mask = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)
                mask[torch.cat(keep[name]).to(param.device)] = 1
                shape = (-1,) + (1,) * (param.dim() - 1)
                masks.append(param.register_hook(lambda grad, mask=mask.view(shape): grad * mask))
    return [{"params": params, "lr_scale": 1.0}]


@torch.no_grad()
def copy_gdn_heads(source: HydraHeadForCausalLM, target: HydraHeadForCausalLM) -> int:
    """Copy every GDN head ``target`` has from ``source`` (where that head is GDN too); returns how many."""
    copied = 0
    for src_layer, dst_layer in zip(source.model.layers, target.model.layers, strict=True):
        src, dst = src_layer.self_attn, dst_layer.self_attn
        shared = [g for g in dst.gdn_groups if g in src.gdn_groups]
        for g in shared:
            src_rows, dst_rows = gdn_rows(src, g), gdn_rows(dst, g)
            src_params, dst_params = dict(src.named_parameters()), dict(dst.named_parameters())
            for name in dst_rows:
                dst_params[name].data[dst_rows[name]] = src_params[name].data[src_rows[name]].to(dst_params[name].dtype)
            copied += 1
        if shared:
            dst.gdn_norm.weight.copy_(src.gdn_norm.weight)
    return copied


# --- the teacher's per-layer inputs and head outputs ----------------------------------------------


@contextmanager
def capture_attention(teacher: nn.Module) -> Iterator[tuple[list, list]]:
    """During a teacher forward, record each layer's attention input and head outputs (o_proj's input)."""
    layers = teacher.model.layers
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    heads: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(lambda _m, _a, out, i=i: inputs.__setitem__(i, out)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args, i=i: heads.__setitem__(i, args[0])))
    try:
        yield inputs, heads
    finally:
        for h in handles:
            h.remove()


def _gdn_inputs(attn: HydraAttention, x: torch.Tensor):
    """The GDN heads' q (B, T, Hg, D) and k, v (B, T, Gg, D) from a layer's attention input x (B, T, d)."""
    B, T, _ = x.shape
    H, D = attn.config.num_attention_heads, attn.config.head_dim
    q = attn.q_proj(x).view(B, T, H, D)[:, :, attn.gdn_queries]
    k = attn.k_proj(x).view(B, T, -1, D)[:, :, attn.gdn_groups]
    v = attn.v_proj(x).view(B, T, -1, D)[:, :, attn.gdn_groups]
    return q, k, v


@torch.no_grad()
def calibrate_gains(teacher: nn.Module, student: HydraHeadForCausalLM, ids: torch.Tensor) -> None:
    """Set each GDN head's gain to the RMS of what it must produce: its teacher head's output, or with a
    ``gdn_window`` what the window misses (teacher minus window), so fused outputs start at the right scale."""
    with capture_attention(teacher) as (inputs, heads):
        teacher.model(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)
    for layer, x, out in zip(student.model.layers, inputs, heads, strict=True):
        attn = layer.self_attn
        if attn.gdn_groups:
            H, D = attn.config.num_attention_heads, attn.config.head_dim
            target = out.reshape(*ids.shape, H, D)[:, :, attn.gdn_queries].float()  # (B, T, Hg, D)
            if attn.config.gdn_window:
                target = target - attn._window_attention(*_gdn_inputs(attn, x), positions, None).float()
            rms = target.pow(2).mean(dim=(0, 1, 3)).sqrt()  # (Hg,)
            attn.head_gain[attn.gdn_queries] = rms.to(attn.head_gain.dtype)


def transfer_loss(teacher: nn.Module, student: HydraHeadForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Stage 1: mean over GDN layers of each layer's head-output MSE relative to the teacher's mean square."""
    with torch.no_grad(), capture_attention(teacher) as (inputs, heads):
        teacher.model(ids)
    B, T = ids.shape
    positions = torch.arange(T, device=ids.device)
    losses = []
    for layer, x, target in zip(student.model.layers, inputs, heads, strict=True):
        attn = layer.self_attn
        if not attn.gdn_groups:
            continue
        H, D = attn.config.num_attention_heads, attn.config.head_dim
        # (B, T, Hg, D), after norm, gain and gate (and with the window's softmax added, when there is one)
        ours = attn._gated_delta(x, *_gdn_inputs(attn, x), None, positions)
        theirs = target.view(B, T, H, D)[:, :, attn.gdn_queries].float()
        losses.append((ours.float() - theirs).pow(2).mean() / theirs.pow(2).mean().clamp_min(1e-8))
    return torch.stack(losses).mean()


def far_copy_positions(ids: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T) bool: positions whose next token can only be recalled from more than ``window`` tokens back.

    Position t is marked when the pair (ids[t], ids[t+1]) was last seen more than ``window`` tokens
    earlier and ids[t] itself has not been seen within ``window`` tokens: a name, an identifier or a
    number that comes back after a long gap, the continuation of which a head with a ``window``-token
    reach cannot see. About 3 % of positions in technical prose at a 256-token window. These are the
    positions where a converted hybrid's long-range path (its GDN state and FA heads) is tested, and
    where the teacher-forced KL of ordinary text, dominated by what local context predicts, says least.
    """
    marks = torch.zeros(ids.shape, dtype=torch.bool)
    for row, tokens in enumerate(ids.tolist()):
        pair_at: dict[tuple[int, int], int] = {}
        token_at: dict[int, int] = {}
        for t in range(len(tokens) - 1):
            pair = (tokens[t], tokens[t + 1])
            before, seen = pair_at.get(pair), token_at.get(tokens[t])
            marks[row, t] = before is not None and t - before > window and (seen is None or t - seen > window)
            pair_at[pair], token_at[tokens[t]] = t, t
    return marks


def plant_copies(ids: torch.Tensor, count: int, min_gap: int, span: tuple[int, int] = (16, 48), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy ``count`` spans of each row's first half verbatim over later text, at least ``min_gap`` tokens on.

    Returns the planted rows and a (B, T) bool mask of the positions that predict a planted token. The
    teacher continues a span it has seen before by copying it (its induction heads reach any distance),
    so its logits there are a dense lesson in long-range copying: the skill a pass key or a name asked for
    after thousands of tokens needs, and the one a hybrid loses when its GDN heads cannot reach back.
    Natural prose holds such repeats too (`far_copy_positions`), but rarely (about 3 % of positions).
    Rows are cut arbitrarily from the text, so an overwritten stretch reads as an abrupt quotation.
    """
    ids = ids.clone()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    rows, length = ids.shape
    shortest, longest = span
    if count <= 0 or length < 2 * longest + min_gap:
        return ids, mask
    rng = random.Random(seed)
    # destinations take equal slots of the row's second half, so they never overlap one another
    lo, hi = length // 2, length
    count = min(count, (hi - lo) // shortest)  # no more copies than the second half has room for
    slot = (hi - lo) // count
    for row in range(rows):
        for k in range(count):
            width = rng.randint(shortest, min(longest, slot))
            dest = lo + k * slot + rng.randint(0, slot - width)
            latest = min(dest - min_gap, lo) - width  # the source ends before the first half does, and far enough back
            if latest < 0:
                continue
            src = rng.randint(0, latest)
            ids[row, dest : dest + width] = ids[row, src : src + width]
            mask[row, dest : dest + width - 1] = True  # position t predicts t+1: the copy's first token is not predictable
    return ids, mask


def distill_loss(teacher: nn.Module, student: HydraHeadForCausalLM, ids: torch.Tensor, chunk: int = 1024,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 2: KL(teacher || student) of the next-token distribution, averaged over every position
    (weighted by ``weights`` (B, T) when given)."""
    with torch.no_grad():
        t_hidden = teacher.model(ids).last_hidden_state  # (B, T, d)
    s_hidden = student.model(ids).last_hidden_state  # (B, T, d)
    t_hidden, s_hidden = t_hidden.flatten(0, 1), s_hidden.flatten(0, 1)  # (N, d)
    w = None if weights is None else weights.flatten().to(s_hidden.device, s_hidden.dtype)
    total = s_hidden.new_zeros(())
    # the vocabulary is wide (49k): take the logits in slices so memory stays bounded
    for start in range(0, s_hidden.shape[0], chunk):
        with torch.no_grad():
            t_logp = F.log_softmax(teacher.lm_head(t_hidden[start : start + chunk]).float(), dim=-1)
        s_logp = F.log_softmax(student.lm_head(s_hidden[start : start + chunk]).float(), dim=-1)
        if w is None:
            total = total + F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
        else:
            per_position = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1)  # (chunk,)
            total = total + (per_position * w[start : start + chunk]).sum()
    return total / (s_hidden.shape[0] if w is None else w.sum().clamp_min(1e-9))


# --- the conversion -------------------------------------------------------------------------------


FAR_COPY_WINDOW = 256  # a hybrid without a GDN window: "far" for the distillation weights
RECOMPUTE_ABOVE = 2048  # stage-2 rows longer than this recompute each layer in the backward pass


@dataclass
class ConvertConfig:
    """One conversion: what to keep FA, what to train on, and for how long."""

    fa_heads: list[list[int]]  # per layer, the KV groups that keep softmax attention
    selection: str = "given"  # how fa_heads was chosen: patching, random, layerwise, file, given
    selection_seed: int | None = None
    stage1_tokens: int = 65536  # tokens of attention transfer
    stage2_tokens: int = 65536  # tokens of distillation on the teacher's logits
    seq_len: int = 512
    batch: int = 4
    # stage 2 may read longer rows than stage 1: what the student gets wrong grows with position (the
    # GDN state drifts past the lengths it was trained on), and retrieval is asked at 2k-4k tokens
    distill_seq_len: int | None = None  # default: seq_len
    distill_batch: int | None = None  # default: batch * seq_len // distill_seq_len rows, so a step reads as many tokens
    lr: float = 1e-3  # stage 1 learning rate (AdamW, cosine to a tenth)
    lr_distill: float = 3e-4  # stage 2 learning rate
    # stage 2 trains the GDN heads and fusion ("gdn"), or every layer's weights ("all": FA heads too,
    # MLPs and norms at a tenth of the rate), so the kept weights can adapt around the GDN heads
    distill_train: str = "gdn"
    # stage 2 weighs positions whose next token repeats what was last seen beyond the GDN window
    # (`far_copy_positions`) 1 + this, every other position 1 (0: plain KL over every position)
    distill_far_copy: float = 0.0
    # stage 2 plants this many copies per row of a span from the row's first half over text at least
    # twice the GDN reach later (`plant_copies`), weighted as far copies (1 + distill_far_copy); 0: off
    distill_plant_copies: int = 0
    seed: int = 0
    device: str = "cpu"
    stage1_from: str | None = None  # a converted folder whose stage-1 GDN heads seed this one
    gdn_window: int = 0  # GDN heads also attend to their sinks and the last this many tokens (0: off)
    gdn_sinks: int = 4
    checkpoint_every: int = 20  # optimizer steps between resumable checkpoints
    extra: dict = field(default_factory=dict)

    def distill_shape(self) -> tuple[int, int]:
        """(rows, tokens per row) of a stage-2 step."""
        seq_len = self.distill_seq_len or self.seq_len
        batch = self.distill_batch or max(1, self.batch * self.seq_len // seq_len)
        return batch, seq_len


@dataclass
class StageReport:
    tokens: int = 0
    steps: int = 0
    loss_first: float | None = None
    loss_final: float | None = None  # mean of the last few steps
    seconds: float = 0.0


Progress = Callable[[str, int, int, float, dict], None]  # (stage, tokens done, tokens total, tokens/s, losses)


def _lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, min(20, steps // 10))
    if step < warm:
        return peak * (step + 1) / warm
    done = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def _train_stage(name, loss_fn, params, batches, tokens, lr, state, report: StageReport, cfg, save, progress) -> None:
    per_step = batches.batch * batches.seq_len
    steps = max(1, tokens // per_step) if tokens else 0
    if steps == 0 or not any(group["params"] for group in params):
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    every = [p for group in params for p in group["params"]]
    if state.get("stage") == name and state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
    start = report.steps
    recent: list[float] = []
    started = time.perf_counter() - report.seconds
    for step in range(start, steps):
        ids = next(batches).to(cfg.device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr) * group["lr_scale"]
        loss = loss_fn(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(every, 1.0)
        opt.step()
        value = loss.detach().item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: the loss became {value} at step {step}; lower the learning rate")
        report.steps, report.tokens = step + 1, (step + 1) * per_step
        report.loss_first = value if report.loss_first is None else report.loss_first
        recent = (recent + [value])[-5:]
        report.loss_final = sum(recent) / len(recent)
        report.seconds = time.perf_counter() - started
        progress(name, report.tokens, steps * per_step, report.tokens / max(report.seconds, 1e-9), {name: value})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save(name, opt)


def convert(teacher: nn.Module, tokenizer, corpus: str | Path, out: str | Path, cfg: ConvertConfig, *,
            resume: bool = False, progress: Progress | None = None, teacher_name: str = "teacher") -> tuple[HydraHeadForCausalLM, dict]:
    """Convert ``teacher`` into a HydraHead model with ``cfg.fa_heads`` kept FA; save it and its report in ``out``.

    Returns the trained student and the report written to ``out/conversion.json``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    progress = progress or (lambda *a: None)
    if cfg.distill_train not in DISTILL_TRAIN:
        raise ValueError(f"distill_train must be one of {', '.join(DISTILL_TRAIN)}; got {cfg.distill_train!r}")
    if cfg.distill_far_copy < 0:
        raise ValueError(f"distill_far_copy must be 0 or more (the extra weight of far-copy positions); got {cfg.distill_far_copy}")
    if cfg.distill_plant_copies < 0:
        raise ValueError(f"distill_plant_copies must be 0 or more (copies planted per stage-2 row); got {cfg.distill_plant_copies}")
    texts = read_texts(corpus, "train")  # fails early and clearly on a bad corpus
    teacher = teacher.to(cfg.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    student = from_llama(teacher, cfg.fa_heads, gdn_window=cfg.gdn_window, gdn_sinks=cfg.gdn_sinks).to(cfg.device)
    if not any(layer.self_attn.gdn_groups for layer in student.model.layers):
        raise ValueError("every head is full attention: there is nothing to convert (the student is the teacher)")
    batches = TokenBatches(texts, tokenizer, cfg.batch, cfg.seq_len, seed=cfg.seed)
    reports = {"stage1": StageReport(), "stage2": StageReport()}
    checkpoint = out / "checkpoint.pt"
    state: dict = {}
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=cfg.device, weights_only=False)
        student.load_state_dict(state["model"])
        for key, value in state["reports"].items():
            reports[key] = StageReport(**value)
        batches.skip_tokens(state["tokens"])
    else:
        calibrate_gains(teacher, student, next(batches).to(cfg.device))
        batches = TokenBatches(texts, tokenizer, cfg.batch, cfg.seq_len, seed=cfg.seed)  # the calibration batch is trained on too
        if cfg.stage1_from:
            source = HydraHeadForCausalLM.from_pretrained(cfg.stage1_from, dtype=next(student.parameters()).dtype).to(cfg.device)
            theirs = (source.config.gdn_window, source.config.gdn_sinks if source.config.gdn_window else 0)
            if theirs != (cfg.gdn_window, cfg.gdn_sinks if cfg.gdn_window else 0):
                raise ValueError(f"{cfg.stage1_from} was trained with gdn_window, gdn_sinks = {theirs}; this conversion asks for "
                                 f"{(cfg.gdn_window, cfg.gdn_sinks)}: a bank only seeds conversions with the same window")
            copied = copy_gdn_heads(source, student)
            wanted = sum(len(layer.self_attn.gdn_groups) for layer in student.model.layers)
            if copied < wanted:
                raise ValueError(f"{cfg.stage1_from} holds {copied} of the {wanted} GDN heads this conversion needs; give a bank whose GDN heads cover them")
            bank = json.loads((Path(cfg.stage1_from) / "conversion.json").read_text())
            reports["stage1"] = StageReport(**bank["stages"]["stage1"])
    out.mkdir(parents=True, exist_ok=True)

    def save(stage: str, opt) -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"model": student.state_dict(), "optimizer": opt.state_dict(), "stage": stage, "tokens": batches.taken,
                    "reports": {k: asdict(v) for k, v in reports.items()}}, tmp)
        tmp.replace(checkpoint)

    params = trainable_parameters(student)
    student.train()
    if not cfg.stage1_from and reports["stage1"].tokens < cfg.stage1_tokens:
        _train_stage("stage1", lambda ids: transfer_loss(teacher, student, ids), params, batches, cfg.stage1_tokens, cfg.lr,
                     state, reports["stage1"], cfg, save, progress)
    batches.batch, batches.seq_len = cfg.distill_shape()
    # rows past 2k tokens do not fit a 24 GB machine's memory with every activation kept (4k rows: OOM)
    student.model.recompute_layers = batches.seq_len > RECOMPUTE_ABOVE
    if cfg.distill_train == "all":
        params = trainable_parameters(student, everything=True)
    if reports["stage2"].tokens < cfg.stage2_tokens:
        reach = cfg.gdn_window or FAR_COPY_WINDOW

        def stage2_loss(ids: torch.Tensor) -> torch.Tensor:
            ids, planted = ids.cpu(), None
            if cfg.distill_plant_copies:
                # seeded by the rows themselves, so a resumed run plants the same copies in the same rows
                ids, planted = plant_copies(ids, cfg.distill_plant_copies, 2 * reach, seed=cfg.seed * 1_000_003 + int(ids[:, :16].sum()))
            weights = None
            if cfg.distill_far_copy:
                far = far_copy_positions(ids, reach)
                if planted is not None:
                    far |= planted
                weights = 1.0 + cfg.distill_far_copy * far.float()
            return distill_loss(teacher, student, ids.to(cfg.device), weights=weights)

        _train_stage("stage2", stage2_loss, params, batches, cfg.stage2_tokens, cfg.lr_distill,
                     state if state.get("stage") == "stage2" else {}, reports["stage2"], cfg, save, progress)
    student.model.recompute_layers = False
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "teacher": teacher_name,
        "selection": cfg.selection,
        "selection_seed": cfg.selection_seed,
        "fa_heads": cfg.fa_heads,
        "layer_heads": student.config.layer_heads,
        "fa_groups": sum(len(g) for g in cfg.fa_heads),
        "total_groups": student.config.num_hidden_layers * student.config.num_key_value_heads,
        "tokens": {"stage1": reports["stage1"].tokens, "stage2": reports["stage2"].tokens},
        "stages": {k: asdict(v) for k, v in reports.items()},
        "losses": {"stage1": reports["stage1"].loss_final, "stage2": reports["stage2"].loss_final},
        "stage1_from": cfg.stage1_from,
        "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("fa_heads", "extra")},
        "wall_s": round(time.perf_counter() - t0, 1),  # this run; a resumed one adds to the stages' seconds
        "device": describe_device(cfg.device),
        **cfg.extra,
    }
    write_report(out, report)
    checkpoint.unlink(missing_ok=True)
    return student, report


def write_report(out: Path, report: dict) -> None:
    tmp = out / "conversion.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "conversion.json")


def describe_device(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
