"""TriAttention key scoring in Triton: stream a sequence's cached keys once, score them for every query head.

The per-head coefficients do not depend on the keys, so they are computed once, in torch, before
the launch: the calibrated mean query rotated by the average RoPE phase of the future positions
(``a = mu * mean_p e^{i w p}``, real and imaginary halves) and the spread ``max(E|q_f| - |mu_f|, 0)``.
What is left per key is three small products against those coefficients:
score = k_re . a_re + k_im . a_im + |k| . spread, one ``tl.dot`` each over a tile of keys
gathered through the block table, for all query heads of a GQA group at once.
Same signature and argument order as ``naive.triattention_score_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _triattention_score_kernel(
    k_cache, block_table, a_re, a_im, spread, out,
    seq_len,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
):
    i_n, i_kv = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < seq_len
    o_f = tl.arange(0, BH)
    m_f = o_f < HALF
    o_g = tl.arange(0, BG)
    m_g = o_g < GROUP
    heads = i_kv * GROUP + o_g

    # (BH, BG) coefficient tiles of this group's query heads, transposed for the products
    m_fg = m_f[:, None] & m_g[None, :]
    coef = heads[None, :] * HALF + o_f[:, None]
    b_are = tl.load(a_re + coef, mask=m_fg, other=0.0)
    b_aim = tl.load(a_im + coef, mask=m_fg, other=0.0)
    b_spread = tl.load(spread + coef, mask=m_fg, other=0.0)

    page = tl.load(block_table + o_n // BLOCK_SIZE, mask=m_n, other=0)
    slot = page.to(tl.int64) * BLOCK_SIZE + o_n % BLOCK_SIZE
    base = (slot[:, None] * HKV + i_kv) * D + o_f[None, :]  # (BN, BH) into (blocks, block_size, HKV, D)
    m_nf = m_n[:, None] & m_f[None, :]
    k_re = tl.load(k_cache + base, mask=m_nf, other=0.0).to(tl.float32)
    k_im = tl.load(k_cache + base + HALF, mask=m_nf, other=0.0).to(tl.float32)
    k_mod = tl.sqrt(k_re * k_re + k_im * k_im)

    b_s = tl.dot(k_re, b_are, input_precision="ieee")
    b_s += tl.dot(k_im, b_aim, input_precision="ieee")
    b_s += tl.dot(k_mod, b_spread, input_precision="ieee")  # (BN, BG)
    tl.store(out + heads[None, :] * seq_len + o_n[:, None], b_s, mask=m_n[:, None] & m_g[None, :])


def triattention_score(k_cache, block_table, seq_len, q_mean, q_abs_mean, inv_freq, query_positions):
    """Score every cached key of one sequence in one layer, per query head. Returns (Hq, seq_len) fp32."""
    if not k_cache.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing hydrabrain.kernels")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, Hkv, D); got {tuple(k_cache.shape)}")
    _, block_size, HKV, D = k_cache.shape
    HQ = q_mean.shape[0]
    half = D // 2
    if D % 2 or q_mean.shape != (HQ, D) or q_abs_mean.shape != (HQ, half) or inv_freq.shape != (half,):
        raise ValueError(
            f"expected an even head dim and q_mean (Hq, D), q_abs_mean (Hq, D/2), inv_freq (D/2,) with D = {D}; got "
            f"q_mean {tuple(q_mean.shape)}, q_abs_mean {tuple(q_abs_mean.shape)}, inv_freq {tuple(inv_freq.shape)}"
        )
    if HQ % HKV:
        raise ValueError(f"Hq = {HQ} query heads must be a multiple of Hkv = {HKV} KV heads")
    seq_len = int(seq_len)
    if seq_len > block_table.shape[0] * block_size:
        raise ValueError(f"seq_len = {seq_len} is longer than the {block_table.shape[0]} blocks of the block table hold")
    out = torch.empty(HQ, seq_len, device=k_cache.device, dtype=torch.float32)
    if seq_len == 0:
        return out

    # the key-independent part, once per call: (Hq, D/2) each
    angles = query_positions.float()[:, None] * inv_freq.float()[None, :]  # (P, D/2)
    rot_re, rot_im = angles.cos().mean(0), angles.sin().mean(0)  # (D/2,)
    mu_re, mu_im = q_mean[:, :half].float(), q_mean[:, half:].float()
    a_re = (mu_re * rot_re - mu_im * rot_im).contiguous()
    a_im = (mu_re * rot_im + mu_im * rot_re).contiguous()
    spread = (q_abs_mean.float() - torch.sqrt(mu_re**2 + mu_im**2)).clamp_min(0.0).contiguous()

    group = HQ // HKV
    BN = 32 if INTERPRETED else 64
    _triattention_score_kernel[(triton.cdiv(seq_len, BN), HKV)](
        k_cache.contiguous(), block_table.to(torch.int32).contiguous(), a_re, a_im, spread, out, seq_len,
        HQ=HQ, HKV=HKV, D=D, HALF=half, BLOCK_SIZE=block_size, GROUP=group,
        BG=max(16, triton.next_power_of_2(group)), BH=max(16, triton.next_power_of_2(half)), BN=BN,
        num_warps=8,
    )
    return out
