"""TriAttention key scoring, pure torch: how much future queries are expected to attend to each key.

After TriAttention (arXiv 2604.04921). RoPE rotates the pair of dimensions ``(f, f + D/2)`` of a
head by the angle ``inv_freq[f] * position``; read as one complex number per frequency ``f``, the
logit between a query at position ``p`` and a key cached post-RoPE is
``sum_f Re(q_f * e^{i w_f p} * conj(k_f))`` where ``q_f`` is the query before RoPE. Pre-RoPE queries
of a head are strongly concentrated, so their calibrated mean ``mu_f`` predicts the logit of the
queries still to come without looking at any attention weight. The spread of the queries around
that mean adds a position-free term, ``(E|q_f| - |mu_f|) * |k_f|``, that favours keys with large
norm in the frequencies where queries vary. Scores are averaged over the future query positions.
"""

from __future__ import annotations

import torch


def triattention_score_ref(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    q_mean: torch.Tensor,
    q_abs_mean: torch.Tensor,
    inv_freq: torch.Tensor,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """Score every cached key of one sequence in one layer, per query head.

    k_cache: (num_blocks, block_size, Hkv, D), keys cached post-RoPE (rotate-half layout: dimension
        ``f`` pairs with ``f + D/2``).
    block_table: (max_blocks,) int32, the sequence's physical blocks in order.
    seq_len: the number of cached tokens to score (physical length).
    q_mean: (Hq, D) fp32, the mean pre-RoPE query of each query head, same layout as the keys.
    q_abs_mean: (Hq, D/2) fp32, the mean modulus ``E|q_f|`` of each frequency pair per query head.
    inv_freq: (D/2,) fp32, the RoPE angular frequency of each pair.
    query_positions: (P,) fp32, the logical positions of the future queries to average over.

    Returns (Hq, seq_len) fp32; higher means the key is expected to matter more. Query head ``h``
    reads KV head ``h // (Hq // Hkv)``.
    """
    num_blocks, block_size, Hkv, D = k_cache.shape
    Hq = q_mean.shape[0]
    half = D // 2
    group = Hq // Hkv
    pos = torch.arange(seq_len, device=k_cache.device)
    slots = block_table.to(torch.long)[pos // block_size] * block_size + pos % block_size  # (N,)
    k = k_cache.reshape(-1, Hkv, D)[slots].float()  # (N, Hkv, D)
    k = k.repeat_interleave(group, dim=1)  # (N, Hq, D)
    k_re, k_im = k[..., :half], k[..., half:]  # (N, Hq, D/2) each
    mu_re, mu_im = q_mean[:, :half].float(), q_mean[:, half:].float()  # (Hq, D/2)
    # The phase every future query adds, averaged over positions: mean_p e^{i w_f p}.
    angles = query_positions.float()[:, None] * inv_freq.float()[None, :]  # (P, D/2)
    rot_re, rot_im = angles.cos().mean(0), angles.sin().mean(0)  # (D/2,)
    # mu_f * mean_p e^{i w_f p}
    a_re = mu_re * rot_re - mu_im * rot_im  # (Hq, D/2)
    a_im = mu_re * rot_im + mu_im * rot_re  # (Hq, D/2)
    # Re(a * conj(k)) = a_re * k_re + a_im * k_im
    coherent = (a_re[None] * k_re + a_im[None] * k_im).sum(-1)  # (N, Hq)
    spread = (q_abs_mean.float() - torch.sqrt(mu_re**2 + mu_im**2)).clamp_min(0.0)  # (Hq, D/2)
    k_mod = torch.sqrt(k_re**2 + k_im**2)  # (N, Hq, D/2)
    incoherent = (spread[None] * k_mod).sum(-1)  # (N, Hq)
    return (coherent + incoherent).transpose(0, 1).contiguous()  # (Hq, N)
