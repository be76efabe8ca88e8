"""Paged decode attention, pure torch: the reference the Triton kernel must match.

Gathers each sequence's keys and values through its block table, then runs one masked softmax per
query head. Grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import torch


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its paged K/V.

    q: (B, Hq, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D); block_tables: (B, max_blocks)
    int32 (entries past a sequence's length are ignored, whatever they hold); seq_lens: (B,) int32.
    Returns (B, Hq, D) in q's dtype; a sequence of length 0 gets zeros. Softmax runs in fp32.
    """
    B, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    lens = seq_lens.to(torch.long)
    L = int(lens.max().item()) if B else 0
    if L == 0:
        return torch.zeros_like(q)
    pos = torch.arange(L, device=q.device)  # (L,)
    pages = block_tables.to(torch.long)[:, pos // block_size].clamp(0, num_blocks - 1)  # (B, L)
    slots = pages * block_size + pos % block_size  # (B, L)
    k = k_cache.reshape(-1, Hkv, D)[slots].float()  # (B, L, Hkv, D)
    v = v_cache.reshape(-1, Hkv, D)[slots].float()  # (B, L, Hkv, D)
    qg = q.float().view(B, Hkv, group, D)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale  # (B, Hkv, G, L)
    valid = (pos[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, L)
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows give NaN; they output zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)
