"""Gated delta rule, token by token, in one Triton kernel: the decode path (T small, state in and out).

Each program owns one (batch, head) pair and a slice of V columns of the state, keeps that
(K, BV) slice in fp32 registers for the whole sequence, and writes it back once at the end, so the
state crosses memory twice whatever T is. Same signature and argument order as
``naive.recurrent_gated_delta_rule_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this is what the kernels below became.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_launchable(t: torch.Tensor) -> None:
    if not t.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing "
            "hydrabrain.kernels (or call the reference through hydrabrain.inference.ops)."
        )


def _maybe_autotune(configs, key):
    # the interpreter cannot autotune: the wrapper passes a fixed block size instead
    if INTERPRETED:
        return lambda fn: fn
    return triton.autotune(configs=configs, key=key)


@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=w, num_stages=1) for bv in (16, 32, 64) for w in (1, 2, 4)],
    key=["K", "V"],
)
@triton.jit
def _fused_recurrent_gdr_kernel(
    q, k, v, g, beta, o, h0, ht,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    # (B, T, H, D) rows: token t of (b, h) sits at ((b * T + t) * H + h) * D
    p_q = q + (i_b * T * H + i_h) * K + o_k
    p_k = k + (i_b * T * H + i_h) * K + o_k
    p_v = v + (i_b * T * H + i_h) * V + o_v
    p_o = o + (i_b * T * H + i_h) * V + o_v
    p_g = g + i_b * T * H + i_h
    p_beta = beta + i_b * T * H + i_h

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        p_h0 = h0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_kv, other=0.0).to(tl.float32)

    for _ in range(0, T):
        b_q = tl.load(p_q, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(p_g).to(tl.float32)
        b_beta = tl.load(p_beta).to(tl.float32)

        b_h *= tl.exp(b_g)
        # the delta: what the decayed state still gets wrong about v
        b_delta = b_beta * (b_v - tl.sum(b_h * b_k[:, None], axis=0))
        b_h += b_k[:, None] * b_delta[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)

        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V
        p_g += H
        p_beta += H

    if STORE_FINAL:
        p_ht = ht + i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_ht, b_h, mask=m_kv)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token gated delta rule on the GPU. Returns (o in v's dtype, fp32 final state or None)."""
    _check_launchable(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(
            f"expected q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be (B, H, K, V) = {(B, H, K, V)}; got {tuple(initial_state.shape)}")
    if K > 256:
        raise ValueError(f"head dim K = {K} is above the 256 this kernel keeps in registers")
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    h0 = initial_state.contiguous() if initial_state is not None else None
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    BK = triton.next_power_of_2(K)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    args = (q, k, v, g, beta, o, h0, ht, scale, T)
    meta = dict(H=H, K=K, V=V, BK=BK, HAS_INITIAL=h0 is not None, STORE_FINAL=output_final_state)
    if INTERPRETED:
        _fused_recurrent_gdr_kernel[grid](*args, **meta, BV=min(32, triton.next_power_of_2(V)))
    else:
        _fused_recurrent_gdr_kernel[grid](*args, **meta)
    return o, ht
