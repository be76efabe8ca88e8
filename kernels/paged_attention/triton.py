"""Paged decode attention in Triton: one query token per sequence against K/V read through the block table.

Flash-decoding split: each program takes one (sequence, KV head, token range), scores every query
head of that GQA group at once (the group is padded to 16 rows so the scores run as one ``tl.dot``),
and keeps an online softmax (running max, running sum, weighted values) over tiles of tokens that
it gathers page by page through the block table. A second small kernel merges the token ranges.
Splitting the tokens is what keeps the GPU busy when B x KV heads is far below the number of SMs.
Same signature and argument order as ``naive.paged_decode_attention_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _paged_decode_split_kernel(
    q, k_cache, v_cache, block_tables, seq_lens, m_part, l_part, acc_part,
    scale,
    max_blocks,
    tokens_per_split,
    num_splits,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    DT: tl.constexpr,
):
    i_b, i_kv, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens + i_b)
    start = i_s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    m_g = o_g < GROUP
    m_d = o_d < D
    heads = i_kv * GROUP + o_g  # the query heads that read this KV head
    b_q = tl.load(q + (i_b * HQ + heads[:, None]) * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.0)
    b_q = (b_q.to(tl.float32) * scale).to(DT)

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for n0 in range(start, end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < end
        page = tl.load(block_tables + i_b * max_blocks + o_n // BLOCK_SIZE, mask=m_n, other=0)
        slot = page.to(tl.int64) * BLOCK_SIZE + o_n % BLOCK_SIZE
        offs = (slot[:, None] * HKV + i_kv) * D + o_d[None, :]  # (BN, BD) into (blocks, block_size, HKV, D)
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k_cache + offs, mask=m_nd, other=0.0).to(DT)
        b_v = tl.load(v_cache + offs, mask=m_nd, other=0.0).to(DT)

        b_s = tl.dot(b_q, tl.trans(b_k))  # (BG, BN)
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        alpha = tl.exp(b_m - m_new)
        b_p = tl.exp(b_s - m_new[:, None])
        b_l = b_l * alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(DT), b_v)
        b_m = m_new

    part = (i_b * HQ + heads) * num_splits + i_s
    tl.store(m_part + part, b_m, mask=m_g)
    tl.store(l_part + part, b_l, mask=m_g)
    tl.store(acc_part + part[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])


@triton.jit
def _paged_decode_merge_kernel(
    m_part, l_part, acc_part, out,
    num_splits,
    D: tl.constexpr,
    BS: tl.constexpr,
    BD: tl.constexpr,
):
    i_bh = tl.program_id(0)
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_s = o_s < num_splits
    m_d = o_d < D
    b_m = tl.load(m_part + i_bh * num_splits + o_s, mask=m_s, other=float("-inf"))
    b_l = tl.load(l_part + i_bh * num_splits + o_s, mask=m_s, other=0.0)
    b_acc = tl.load(acc_part + (i_bh * num_splits + o_s[:, None]) * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)
    m_all = tl.max(b_m, axis=0)
    # a split that saw no token has m = -inf and weighs exp(-inf) = 0; an empty sequence gives zeros
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)
    weight = tl.exp(b_m - m_all)
    total = tl.sum(b_l * weight, axis=0)
    b_o = tl.sum(b_acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + i_bh * D + o_d, b_o.to(out.dtype.element_ty), mask=m_d)


def _num_splits(batch_kv: int, max_tokens: int, bn: int, device: torch.device) -> int:
    if INTERPRETED:
        return max(1, min(4, triton.cdiv(max_tokens, bn)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # about two programs per SM, and never a split shorter than two tiles
    return max(1, min(triton.cdiv(2 * sms, batch_kv), triton.cdiv(max_tokens, 2 * bn), 64))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """One query token per sequence against its paged K/V (GQA). q: (B, Hq, D) -> (B, Hq, D) in q's dtype."""
    if not q.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing hydrabrain.kernels")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q (B, Hq, D) and k_cache, v_cache (num_blocks, block_size, Hkv, D) alike; got q {tuple(q.shape)}, "
            f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, HQ, D = q.shape
    _, block_size, HKV, Dk = k_cache.shape
    if Dk != D or HQ % HKV:
        raise ValueError(f"head dims must match (q {D}, cache {Dk}) and Hq = {HQ} must be a multiple of Hkv = {HKV}")
    if block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables must be (B, max_blocks) and seq_lens (B,) with B = {B}")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    max_blocks = block_tables.shape[1]
    max_tokens = max_blocks * block_size
    group = HQ // HKV
    BG = max(16, triton.next_power_of_2(group))
    BD = max(16, triton.next_power_of_2(D))
    BN = 32 if INTERPRETED else 64
    splits = _num_splits(B * HKV, max_tokens, BN, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(max(max_tokens, 1), splits), BN) * BN
    splits = max(1, triton.cdiv(max(max_tokens, 1), tokens_per_split))
    dt = tl.float32 if INTERPRETED or q.dtype == torch.float32 else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]

    m_part = torch.empty(B, HQ, splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B, HQ, splits, D, device=q.device, dtype=torch.float32)
    _paged_decode_split_kernel[(B, HKV, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, m_part, l_part, acc_part,
        float(scale), max_blocks, tokens_per_split, splits,
        HQ=HQ, HKV=HKV, D=D, BLOCK_SIZE=block_size, GROUP=group, BG=BG, BD=BD, BN=BN, DT=dt,
        num_warps=4 if INTERPRETED else 8, num_stages=2,
    )
    out = torch.empty_like(q)
    _paged_decode_merge_kernel[(B * HQ,)](m_part, l_part, acc_part, out, splits, D=D, BS=max(2, triton.next_power_of_2(splits)), BD=BD)
    return out
