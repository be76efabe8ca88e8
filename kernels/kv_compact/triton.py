"""KV compaction in Triton: move each kept token from its src slot to its dst slot, in place.

Why it is safe in place: the list runs in token order within each sequence and every survivor
moves to an earlier (or the same) token position of its own sequence, whose blocks no other
sequence shares. So a write to dst_i can only land on the src of a token that comes earlier in the
list, never a later one, wherever the blocks sit physically. Each program therefore
walks the token list in order, one tile at a time, reads the whole tile, waits at a barrier, then
writes it. Programs split the row (KV heads x head dim) into column slices and take the K and the V
cache separately: slices are disjoint memory, so they never race with each other. Tokens that do
not move are neither read nor written. Same signature and argument order as ``naive.kv_compact_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _move_columns(cache, src_slots, dst_slots, n, i_c, ROW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < ROW
    for n0 in range(0, n, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n
        src = tl.load(src_slots + o_n, mask=m_n, other=0).to(tl.int64)
        dst = tl.load(dst_slots + o_n, mask=m_n, other=0).to(tl.int64)
        moves = m_n & (src != dst)
        m = moves[:, None] & m_c[None, :]
        rows = tl.load(cache + src[:, None] * ROW + o_c[None, :], mask=m)
        # every read of this tile lands before any write of it: a dst here may be a src here
        tl.debug_barrier()
        tl.store(cache + dst[:, None] * ROW + o_c[None, :], rows, mask=m)


@triton.jit
def _kv_compact_kernel(k_cache, v_cache, src_slots, dst_slots, n, ROW: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    i_c, which = tl.program_id(0), tl.program_id(1)
    if which == 0:
        _move_columns(k_cache, src_slots, dst_slots, n, i_c, ROW, BN, BC)
    else:
        _move_columns(v_cache, src_slots, dst_slots, n, i_c, ROW, BN, BC)


def kv_compact(k_cache, v_cache, src_slots, dst_slots):
    """Move each kept token from src slot to dst slot in place; survivors slide forward in token order. Returns nothing.

    Unlike the reference, an arbitrary permutation is not supported: the token-order argument above
    is what makes one pass in place safe.
    """
    if not k_cache.is_cuda and not INTERPRETED:
        raise RuntimeError("Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing hydrabrain.kernels")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, Hkv, D); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("kv_compact works in place and needs contiguous caches")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError(f"src_slots and dst_slots must be 1-D and the same length; got {tuple(src_slots.shape)}, {tuple(dst_slots.shape)}")
    n = src_slots.numel()
    if n == 0:
        return
    row = k_cache.shape[2] * k_cache.shape[3]
    src = src_slots.to(device=k_cache.device, dtype=torch.int64).contiguous()
    dst = dst_slots.to(device=k_cache.device, dtype=torch.int64).contiguous()
    bc = min(64 if INTERPRETED else 128, triton.next_power_of_2(row))
    # 32 x 128 tiles on 8 warps: no register spills on sm_90 (per ptxas), unlike 64-token tiles
    _kv_compact_kernel[(triton.cdiv(row, bc), 2)](k_cache, v_cache, src, dst, n, ROW=row, BN=32, BC=bc, num_warps=8)
