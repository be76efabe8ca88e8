"""KV compaction policies: which cached tokens survive when a sequence is over its KV budget.

A policy only picks survivors; the block pool and ``compaction_remap`` move them. Every policy keeps
the first ``sinks`` tokens (attention sinks) and the ``recent`` most recent ones, and fills the rest
of the budget by its own score:

- ``recent``: nothing else (StreamingLLM): the floor every other policy must beat.
- ``h2o``: attention mass each cached key has received, accumulated over every query since it was
  cached (H2O), so a key's score does not restart at each pass.
- ``snapkv``: waits for the end of the prompt, then the last ``window`` prompt tokens (the
  observation window, which holds the question) vote by attention for the earlier keys, votes
  max-pooled over ``pool`` neighbours (SnapKV), or averaged over aligned ``chunk``-token chunks so
  that whole chunks survive (`pool_votes`); later passes add decode-time attention (as h2o).
- ``triattention``: keys scored from calibrated pre-RoPE query statistics (no attention weight),
  standardised per head and summed over passes.
- ``heads``: the KV heads that causal patching ranks highest keep their whole K/V beside the
  blocks; every other head is compacted by snapkv so that the total stays within the budget.

Selection is per KV head (each head keeps its own tokens, in the same number of slots) or per layer
(one set of tokens for every head of a layer): ``snapkv:layer``, ``h2o:head`` and so on. Budgets are
even across heads and layers: one block table serves them all, so an uneven split (Ada-KV,
PyramidKV) would free no block; ``heads`` is the one uneven split, paid for in reserved blocks.

Streaming policies (``recent``, ``h2o``, ``triattention``) compact while the prompt is read, so the
peak is the budget plus a prefill chunk. Prompt-end policies (``snapkv``, ``heads``) hold the whole
prompt until it has been read: their peak is the prompt, their steady state the budget.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hydrabrain.inference import ops
from hydrabrain.inference.kv_cache import PagedKVCache
from hydrabrain.inference.scoring import FUTURE_OFFSETS, QueryStats, select_keep

POLICY_NAMES = ("recent", "h2o", "snapkv", "triattention", "heads", "auto")
GRANULARITIES = ("head", "layer")


class UnknownPolicy(ValueError):
    """The policy name (or its option) is not one this engine knows."""


@dataclass(frozen=True)
class PolicySpec:
    name: str  # one of POLICY_NAMES
    granularity: str | None = None  # "head" or "layer"; None takes the policy's own default


def parse_policy(spec: str) -> PolicySpec:
    """``name`` or ``name:head`` / ``name:layer``; raises UnknownPolicy naming the choices."""
    name, _, option = spec.strip().lower().partition(":")
    if name not in POLICY_NAMES:
        raise UnknownPolicy(f"unknown KV policy {spec!r}; choose one of {', '.join(POLICY_NAMES)} (optionally :head or :layer)")
    if option and option not in GRANULARITIES:
        raise UnknownPolicy(f"unknown selection {option!r} in KV policy {spec!r}; use :head or :layer")
    return PolicySpec(name, option or None)


@dataclass
class PolicyState:
    """What a policy remembers about one sequence between passes."""

    scores: list[torch.Tensor | None] = field(default_factory=list)  # per layer (Hkv, N), aligned with the cache
    window: list[torch.Tensor | None] = field(default_factory=list)  # per layer, the last queries (W, Hq, D) post-RoPE
    window_len: int = 0


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, D) by each row's logical position (N,), rotate-half layout (as the runners do)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (N, D/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, first_index: int, scale: float) -> torch.Tensor:
    """Attention each key receives from the queries, summed over queries and grouped per KV head (Hkv, L).

    queries: (T, Hq, D) post-RoPE at physical indices first_index .. first_index + T - 1 (causal);
    keys: (L, Hkv, D) post-RoPE, the sequence's cache of one layer.
    """
    t, hq, _ = queries.shape
    n, hkv, _ = keys.shape
    k = keys.float().repeat_interleave(hq // hkv, dim=1)  # (L, Hq, D)
    logits = torch.einsum("thd,lhd->htl", queries.float(), k) * scale  # (Hq, T, L)
    visible = torch.arange(n)[None, :] <= (first_index + torch.arange(t))[:, None]  # (T, L)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.sum(1).view(hkv, hq // hkv, n).sum(1)  # (Hkv, L)


class Policy(ABC):
    """The interface: ``observe`` after each forward (when ``needs_queries``), ``plan`` at each pass."""

    name = "policy"
    streaming = True  # compacts while the prompt is read; False waits for the end of the prompt
    needs_queries = False  # wants each forward's queries (attention-based scores)
    whole_heads: list[tuple[int, int]] = []  # (layer, KV head) kept whole (the heads policy)
    default_granularity = "head"

    def __init__(self, *, sinks: int, recent: int, granularity: str | None = None, scale: float = 1.0, inv_freq: torch.Tensor | None = None) -> None:
        self.sinks, self.recent, self.scale, self.inv_freq = sinks, recent, scale, inv_freq
        self.granularity = granularity or self.default_granularity

    @property
    def label(self) -> str:
        return self.name if self.granularity == self.default_granularity else f"{self.name}:{self.granularity}"

    def new_state(self, num_layers: int) -> PolicyState:
        return PolicyState([None] * num_layers, [None] * num_layers)

    def observe(self, state: PolicyState, cache: PagedKVCache, seq_id: str, queries: Sequence[torch.Tensor | None], positions: torch.Tensor, prompt_read: bool) -> None:
        """The T tokens just cached (the last T physical slots) were read with these pre-RoPE queries (T, Hq, D) per layer."""

    def end_of_prompt(self, state: PolicyState, cache: PagedKVCache, seq_id: str) -> None:
        """The prompt (or the document before the questions) has been read; nothing has been compacted since."""

    @abstractmethod
    def layer_scores(self, state: PolicyState, cache: PagedKVCache, seq_id: str, layer: int, next_position: int) -> torch.Tensor:
        """(Hkv, N) scores of the layer's cached tokens; higher survives."""

    def plan(self, state: PolicyState, cache: PagedKVCache, seq_id: str, next_position: int, budget: int) -> list:
        """The survivors of every layer (per KV head or shared), and the scores remapped to them."""
        n = cache.length(seq_id)
        plan: list = []
        for layer in range(len(cache.k)):
            if not cache.kv_heads[layer]:
                plan.append([])
                continue
            scores = self.layer_scores(state, cache, seq_id, layer, next_position)  # (Hkv, N)
            if self.granularity == "head":
                keep = [select_keep(s, budget, self.sinks, self.recent) for s in scores]
            else:
                keep = [select_keep(self._combine(scores), budget, self.sinks, self.recent)] * scores.shape[0]
            if state.scores[layer] is not None:
                state.scores[layer] = torch.stack([state.scores[layer][h, kh] for h, kh in enumerate(keep)])
            plan.append(keep if self.granularity == "head" else keep[0])
        # A layer without full-attention heads holds no K/V: its list only has to be the right length.
        return [k if cache.kv_heads[layer] else list(range(min(n, budget))) for layer, k in enumerate(plan)]

    def _combine(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.sum(0)  # attention mass adds over heads


class Recent(Policy):
    name = "recent"

    def layer_scores(self, state, cache, seq_id, layer, next_position):
        n = cache.length(seq_id)
        return torch.arange(n, dtype=torch.float32).expand(cache.kv_heads[layer], n)  # newest first


class H2O(Policy):
    name = "h2o"
    needs_queries = True

    def observe(self, state, cache, seq_id, queries, positions, prompt_read):
        n = cache.length(seq_id)
        t = int(positions.shape[0])
        for layer, q in enumerate(queries):
            if q is None or not cache.kv_heads[layer]:
                continue
            keys, _ = cache.gather(layer, seq_id)
            mass = attention_mass(rope(q, positions, self.inv_freq), keys, n - t, self.scale)
            self._accumulate(state, layer, mass)

    @staticmethod
    def _accumulate(state: PolicyState, layer: int, mass: torch.Tensor) -> None:
        prev = state.scores[layer]
        if prev is not None and prev.shape[1] < mass.shape[1]:
            prev = torch.nn.functional.pad(prev, (0, mass.shape[1] - prev.shape[1]))
        state.scores[layer] = mass if prev is None else prev + mass

    def layer_scores(self, state, cache, seq_id, layer, next_position):
        n = cache.length(seq_id)
        scores = state.scores[layer]
        if scores is None:
            scores = torch.zeros(cache.kv_heads[layer], n)
        elif scores.shape[1] < n:  # tokens cached without an observation (none in practice)
            scores = torch.nn.functional.pad(scores, (0, n - scores.shape[1]))
        state.scores[layer] = scores
        return scores


def pool_votes(votes: torch.Tensor, pool: int, chunk: int = 0) -> torch.Tensor:
    """Smooth a window's votes (Hkv, N) so that what survives keeps its neighbours.

    ``chunk`` 0: max-pool over ``pool`` neighbours (SnapKV). ``chunk`` C > 1: every token scores its
    aligned C-token chunk's mean vote (in the manner of ChunkKV), plus a sliver of its own pooled vote
    so that a chunk cut by the budget keeps its best tokens: selection then takes whole chunks, and a
    fact spread over several tokens (a name and the number after it) survives or goes as one.
    """
    pooled = torch.nn.functional.max_pool1d(votes[:, None], pool, stride=1, padding=pool // 2)[:, 0]
    if chunk <= 1:
        return pooled
    hkv, n = votes.shape
    padded = torch.nn.functional.pad(votes, (0, (-n) % chunk))
    means = padded.view(hkv, -1, chunk).mean(-1).repeat_interleave(chunk, dim=1)[:, :n]
    return means + 1e-3 * pooled


class SnapKV(H2O):
    name = "snapkv"
    streaming = False

    def __init__(self, *, window: int = 32, pool: int = 7, chunk: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window, self.pool, self.chunk = window, pool, chunk

    def observe(self, state, cache, seq_id, queries, positions, prompt_read):
        if prompt_read:  # after the prompt-end pass, decode-time attention accumulates as in h2o
            super().observe(state, cache, seq_id, queries, positions, prompt_read)
            return
        for layer, q in enumerate(queries):
            if q is None or not cache.kv_heads[layer]:
                continue
            q = rope(q, positions, self.inv_freq)
            state.window[layer] = q[-self.window :] if state.window[layer] is None else torch.cat([state.window[layer], q])[-self.window :]
        state.window_len = min(self.window, state.window_len + int(positions.shape[0]))

    def layer_scores(self, state, cache, seq_id, layer, next_position):
        return super().layer_scores(state, cache, seq_id, layer, next_position)

    def end_of_prompt(self, state, cache, seq_id):
        """The observation window votes once for every key read so far; decode-time attention adds to it."""
        for layer, window in enumerate(state.window):
            if window is None:
                continue
            keys, _ = cache.gather(layer, seq_id)
            votes = attention_mass(window, keys, keys.shape[0] - window.shape[0], self.scale)  # (Hkv, N)
            pooled = pool_votes(votes, self.pool, self.chunk)
            self._accumulate(state, layer, pooled)
            state.window[layer] = None


class TriAttention(Policy):
    name = "triattention"
    default_granularity = "layer"

    def __init__(self, *, stats: QueryStats, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stats = stats

    def layer_scores(self, state, cache, seq_id, layer, next_position):
        seq = cache.seqs[seq_id]
        table = torch.tensor(seq.blocks, dtype=torch.int32)
        positions = torch.tensor([next_position + o for o in FUTURE_OFFSETS], dtype=torch.float32)
        per_query_head = ops.triattention_score(cache.k[layer], table, seq.length, self.stats.q_mean[layer], self.stats.q_abs_mean[layer], self.stats.inv_freq, positions)  # (Hq, N)
        # Heads differ in scale; standardising lets a key that one head needs survive.
        z = (per_query_head - per_query_head.mean(-1, keepdim=True)) / (per_query_head.std(-1, keepdim=True) + 1e-6)
        hkv = cache.kv_heads[layer]
        z = z.view(hkv, -1, z.shape[-1]).max(1).values  # (Hkv, N)
        prev = state.scores[layer]
        if prev is not None and prev.shape[1] < z.shape[1]:
            prev = torch.nn.functional.pad(prev, (0, z.shape[1] - prev.shape[1]))
        state.scores[layer] = z if prev is None else prev + z  # accumulated over passes
        return state.scores[layer]

    def _combine(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.max(0).values  # the best head decides, as before


class Heads(SnapKV):
    name = "heads"

    def __init__(self, *, whole_heads: Sequence[tuple[int, int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.whole_heads = list(whole_heads)

    def whole_by_layer(self, num_layers: int) -> list[list[int]]:
        by_layer: list[list[int]] = [[] for _ in range(num_layers)]
        for layer, head in self.whole_heads:
            by_layer[layer].append(head)
        return [sorted(h) for h in by_layer]


# --- the head ranking the heads policy reads --------------------------------------------------------


def load_head_ranking(path: str | Path) -> list[tuple[int, int]]:
    """(layer, KV group) best first, from a ranking file (``hydrabrain model heads --out`` writes one)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    scores = data["scores"]
    if data.get("search") != "greedy":  # a greedy file is already in the order chosen (its scores are cumulative)
        scores = sorted(scores, key=lambda s: -s["restored"])
    return [(int(s["layer"]), int(s["group"])) for s in scores]


def rank_heads(hf_model, tokenizer, path: str | Path, samples: int = 2, filler_repeats: int = 3) -> list[tuple[int, int]]:
    """Rank the model's KV groups by causal patching on the pass-key probe and cache the result at ``path``."""
    from hydrabrain.inference.patching import passkey_probe, patch_heads

    result = patch_heads(hf_model, passkey_probe(tokenizer, samples=samples, filler_repeats=filler_repeats))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"probe": "passkey", "samples": samples, "filler": filler_repeats,
                               "clean_logit_diff": result.clean_logit_diff, "corrupt_logit_diff": result.corrupt_logit_diff,
                               "scores": [vars(s) for s in result.scores]}, indent=1))
    tmp.replace(path)
    return [(s.layer, s.group) for s in result.scores]

