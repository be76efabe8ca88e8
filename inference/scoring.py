"""TriAttention-style key scoring: calibrate pre-RoPE query statistics once, then pick survivors.

Calibration runs the model over plain text and records, per layer and query head, the mean
pre-RoPE query and the mean modulus of each RoPE frequency pair. Scoring (``ops.triattention_score``)
predicts from those numbers, and the distance to the positions still to come, how much future
queries will attend to each cached key; no attention weight is ever computed. Selection always
keeps the first tokens (attention sinks) and the most recent window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydrabrain.inference import ops
from hydrabrain.inference.kv_cache import PagedKVCache

# Plain prose for calibration: query statistics depend little on the text, much on the head.
CALIBRATION_TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel, a baker opened the "
    "shutters, and the first bus of the morning coughed up the hill toward the school. In the library "
    "a clerk sorted returned books by the color of their spines, because nobody had ever told her not "
    "to, and the children who came in after class learned to look for adventure stories among the "
    "greens and for history among the browns. Engineers from the county arrived in the spring to "
    "measure the old bridge. They found that the stones had settled two inches since the survey of "
    "their grandfathers, wrote a report of forty pages, and recommended that heavy trucks use the road "
    "along the eastern bank. The town council debated the report for three evenings. Some members "
    "argued that the bridge had stood for two centuries and would stand for two more; others pointed "
    "out that the trucks were heavier every year. In the end they voted to repair the arches and to "
    "paint the railings blue, which pleased everyone except the painter, who preferred green. "
    "Summer brought tourists, who photographed the bridge from every angle and asked the baker where "
    "the best view of the valley could be found. He always sent them up the path behind the church, "
    "past the orchard and the ruined mill, to a bench that his father had built from the wood of a "
    "fallen oak. From there, on a clear day, one could count eleven villages and the silver line of "
    "the sea. Autumn was quieter. The school held its harvest fair, the library ran a contest for the "
    "best short story about the river, and the engineers came back to inspect the repairs. They "
    "measured again, wrote a shorter report, and declared the bridge sound for another fifty years."
)

# 64 .. 4096 tokens ahead, spaced geometrically. Near offsets add high-frequency phase noise that
# crowds out distant facts: on pass-key probes (1.4k tokens, budget 256) 1..4096 kept 2/6, 64..4096 kept 5/6.
FUTURE_OFFSETS = tuple(2**i for i in range(6, 13))


@dataclass
class QueryStats:
    """Per layer: mean pre-RoPE query (Hq, D) and mean modulus per frequency pair (Hq, D/2)."""

    q_mean: list[torch.Tensor]
    q_abs_mean: list[torch.Tensor]
    inv_freq: torch.Tensor  # (D/2,)


def calibrate(runner, token_ids: torch.Tensor, chunk: int = 512) -> QueryStats:
    """Run ``runner`` (a PagedLlama) over ``token_ids`` and average its pre-RoPE queries."""
    half = runner.head_dim // 2
    # Sized by the first call: a hybrid model hands over only its full-attention query heads.
    sums = [torch.zeros(0, runner.head_dim) for _ in range(runner.num_layers)]
    abs_sums = [torch.zeros(0, half) for _ in range(runner.num_layers)]
    count = 0

    def hook(layer: int, q: torch.Tensor) -> None:  # q: (T, Hq, D)
        q = q.float()
        if sums[layer].shape[0] != q.shape[1]:
            sums[layer], abs_sums[layer] = torch.zeros(q.shape[1], runner.head_dim), torch.zeros(q.shape[1], half)
        sums[layer] += q.sum(0)
        abs_sums[layer] += torch.sqrt(q[..., :half] ** 2 + q[..., half:] ** 2).sum(0)

    n = int(token_ids.shape[0])
    cache = runner.new_cache(num_blocks=-(-n // 16) + 1)
    cache.add("calibration")
    for start in range(0, n, chunk):
        piece = token_ids[start : start + chunk]
        runner.prefill(cache, "calibration", piece, start, query_hook=hook)
        count += int(piece.shape[0])
    return QueryStats([s / count for s in sums], [a / count for a in abs_sums], runner.inv_freq.clone())


def score_layer(cache: PagedKVCache, seq_id: str, layer: int, stats: QueryStats, next_position: int) -> torch.Tensor:
    """One score per cached token of one layer (N,): each head's scores standardised, max over heads."""
    seq = cache.seqs[seq_id]
    table = torch.tensor(seq.blocks, dtype=torch.int32)
    positions = torch.tensor([next_position + o for o in FUTURE_OFFSETS], dtype=torch.float32)
    per_head = ops.triattention_score(cache.k[layer], table, seq.length, stats.q_mean[layer], stats.q_abs_mean[layer], stats.inv_freq, positions)  # (Hq, N)
    # Heads differ in scale; standardising lets a key that one head needs survive.
    z = (per_head - per_head.mean(-1, keepdim=True)) / (per_head.std(-1, keepdim=True) + 1e-6)
    return z.max(0).values


def select_keep(scores: torch.Tensor, budget: int, sinks: int, recent: int) -> list[int]:
    """Ascending indices of the ``budget`` tokens to keep: sinks, the recent window, then top scores."""
    n = int(scores.shape[0])
    if n <= budget:
        return list(range(n))
    if budget < sinks + recent:
        raise ValueError(f"a KV budget of {budget} tokens cannot hold {sinks} sink and {recent} recent tokens")
    middle = scores[sinks : n - recent]
    top = torch.topk(middle, budget - sinks - recent).indices + sinks
    chosen = torch.cat([torch.arange(sinks), top, torch.arange(n - recent, n)])
    return sorted(chosen.tolist())


def plan_compaction(cache: PagedKVCache, seq_id: str, stats: QueryStats, next_position: int, budget: int, sinks: int, recent: int) -> list[list[int]]:
    """Which tokens each layer keeps (same count in every layer)."""
    keeps = [
        select_keep(score_layer(cache, seq_id, layer, stats, next_position), budget, sinks, recent) if cache.kv_heads[layer] else None
        for layer in range(len(cache.k))
    ]
    # A layer with no full-attention head holds no K/V; any list of the right length will do.
    filler = next((k for k in keeps if k is not None), None) or select_keep(torch.zeros(cache.length(seq_id)), budget, sinks, recent)
    return [k if k is not None else filler for k in keeps]
