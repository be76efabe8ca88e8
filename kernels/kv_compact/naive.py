"""KV compaction, pure torch: move kept tokens to their new slots in place."""

from __future__ import annotations

import torch


def kv_compact_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Copy the token at each ``src_slots[i]`` to ``dst_slots[i]`` in both caches, in place.

    k_cache, v_cache: (num_blocks, block_size, Hkv, D); src_slots, dst_slots: (N,) int (int32 or
    int64), a slot being ``block * block_size + offset``. Within one sequence the survivors slide
    forward in token order, so ``dst <= src`` and both are ascending; the reference reads every
    source before writing, which is also correct for any permutation without duplicated targets.
    Slots not named keep their contents. Returns nothing.
    """
    if src_slots.numel() == 0:
        return
    src = src_slots.to(device=k_cache.device, dtype=torch.long)
    dst = dst_slots.to(device=k_cache.device, dtype=torch.long)
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *cache.shape[2:])  # (num_blocks * block_size, Hkv, D)
        flat[dst] = flat[src].clone()
