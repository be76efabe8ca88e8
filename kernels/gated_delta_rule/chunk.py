"""Gated delta rule over whole sequences in 64-token chunks (WY / UT transform), in Triton.

Three launches, the same split the chunked algorithm itself suggests:

1. ``_prepare_kernel`` (one program per chunk and head, all parallel): the chunk-local cumulative
   log decay gamma, the strictly lower-triangular A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j, its
   unit-triangular inverse T = (I + A)^-1 by forward substitution, then W = T (beta exp(gamma) K)
   and U = T (beta V).
2. ``_state_kernel`` (one program per head and V slice, sequential over chunks): the only
   recurrence left. It records the state at each chunk start and the corrected deltas
   U - W S, and carries S to the next chunk.
3. ``_output_kernel`` (one program per chunk, head and V slice, all parallel):
   o = scale (exp(gamma) Q) S + causal(scale Q K^T * decay) (U - W S).

The backward recomputes the forward through the differentiable pure-torch chunked reference
(``naive.chunk_gated_delta_rule_ref``) and lets autograd differentiate it: exact gradients at the
reference's cost, no Triton backward kernel yet. Same signature and argument order as the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydrabrain.kernels.gated_delta_rule.fused_recurrent import INTERPRETED, _check_launchable, _maybe_autotune
from hydrabrain.kernels.gated_delta_rule.naive import chunk_gated_delta_rule_ref

CHUNK = 64


@_maybe_autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3)], key=["K", "V"])
@triton.jit
def _prepare_kernel(
    k, v, g, beta, gamma, w, u,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
    DT: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    row = (i_b * T + o_t) * H + i_h  # (BT,) index of each token's (b, t, h) row

    b_g = tl.load(g + row, mask=m_t, other=0.0).to(tl.float32)
    b_gamma = tl.cumsum(b_g, axis=0)
    tl.store(gamma + row, b_gamma, mask=m_t)
    b_beta = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)

    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_k = b_k.to(DT)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=PRECISION)

    o_i = tl.arange(0, BT)
    strictly_lower = o_i[:, None] > o_i[None, :]
    # masked before exp: above the diagonal gamma_i - gamma_j is positive and may overflow
    gap = tl.where(strictly_lower, b_gamma[:, None] - b_gamma[None, :], float("-inf"))
    b_a = tl.where(strictly_lower, b_beta[:, None] * b_kk * tl.exp(gap), 0.0)

    # forward substitution, row by row: T_i = e_i - sum_{j<i} A_ij T_j (numerically tame, unlike
    # a Neumann-series product, whose terms cancel catastrophically for near-parallel keys)
    b_inv = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, BT):
        a_i = tl.sum(tl.where(o_i[:, None] == i, b_a, 0.0), axis=0)  # (BT,) row i of A, indexed by j
        t_i = tl.where(o_i == i, 1.0, 0.0) - tl.sum(a_i[:, None] * b_inv, axis=0)
        b_inv = tl.where(o_i[:, None] == i, t_i[None, :], b_inv)
    b_inv_dt = b_inv.to(DT)

    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m, other=0.0).to(tl.float32)
        b_u = tl.dot(b_inv_dt, (b_v * b_beta[:, None]).to(DT), input_precision=PRECISION)
        tl.store(u + row[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m)

    b_kscale = b_beta * tl.exp(b_gamma)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m, other=0.0).to(tl.float32)
        b_w = tl.dot(b_inv_dt, (b_k * b_kscale[:, None]).to(DT), input_precision=PRECISION)
        tl.store(w + row[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m)


@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=s) for bv in (16, 32, 64) for nw in (2, 4, 8) for s in (1, 2, 3)],
    key=["K", "V"],
)
@triton.jit
def _state_kernel(
    k, w, u, gamma, h0, hs, v_new, ht,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
    DT: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        b_h += tl.load(h0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(0, NT):
        # hs is (B, NT, H, K, V): the state each chunk starts from, for the output kernel
        p_hs = hs + ((i_b * NT + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_hs, b_h.to(hs.dtype.element_ty), mask=m_kv)

        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        row = (i_b * T + o_t) * H + i_h
        b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_u = tl.load(u + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        b_vn = b_u - tl.dot(b_w.to(DT), b_h.to(DT), input_precision=PRECISION)
        tl.store(v_new + row[:, None] * V + o_v[None, :], b_vn.to(v_new.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

        last = tl.minimum(T, (i_t + 1) * BT) - 1
        b_glast = tl.load(gamma + (i_b * T + last) * H + i_h)
        b_gamma = tl.load(gamma + row, mask=m_t, other=0.0)
        b_tail = tl.where(m_t, tl.exp(b_glast - b_gamma), 0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_kd = (b_k * b_tail[:, None]).to(DT)
        b_h = b_h * tl.exp(b_glast) + tl.dot(tl.trans(b_kd), b_vn.to(DT), input_precision=PRECISION)

    if STORE_FINAL:
        tl.store(ht + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=s) for bv in (32, 64, 128) for nw in (2, 4, 8) for s in (1, 2, 3)],
    key=["K", "V"],
)
@triton.jit
def _output_kernel(
    q, k, v_new, gamma, hs, o,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
    DT: tl.constexpr,
):
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    row = (i_b * T + o_t) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        p_h = hs + ((i_b * NT + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h = tl.load(p_h, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_q, b_k = b_q.to(DT), b_k.to(DT)
        b_o += tl.dot(b_q, b_h.to(DT), input_precision=PRECISION)
        b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)

    b_gamma = tl.load(gamma + row, mask=m_t, other=0.0)
    b_o = b_o * (tl.exp(b_gamma) * scale)[:, None]
    o_i = tl.arange(0, BT)
    causal = o_i[:, None] >= o_i[None, :]
    gap = tl.where(causal, b_gamma[:, None] - b_gamma[None, :], float("-inf"))
    b_a = tl.where(causal, b_qk * tl.exp(gap) * scale, 0.0)
    b_vn = tl.load(v_new + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o += tl.dot(b_a.to(DT), b_vn.to(DT), input_precision=PRECISION)
    tl.store(o + row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


def _check_shapes(q, k, v, g, beta, initial_state) -> None:
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(
            f"expected q, k (B, T, H, K), v (B, T, H, V), g and beta (B, T, H); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"initial_state must be (B, H, K, V) = {(B, H, K, V)}; got {tuple(initial_state.shape)}")
    if K > 256 or V > 256:
        raise ValueError(f"head dims K = {K}, V = {V}: this kernel handles up to 256 each")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q, k, v must be fp32, bf16 or fp16; got {q.dtype}")


def _chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = CHUNK
    NT = triton.cdiv(T, BT)
    k = k.to(q.dtype).contiguous()
    q, v, g, beta = q.contiguous(), v.to(q.dtype).contiguous(), g.contiguous(), beta.contiguous()
    # fp32 inputs get true fp32 products; half inputs run the tensor cores in their own type
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # the interpreter multiplies half-precision tiles as raw integer bits: keep its products in fp32
    dot_dtype = tl.float32 if INTERPRETED or q.dtype == torch.float32 else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]
    BK = max(16, triton.next_power_of_2(K))
    BK_TILE = min(64, BK)

    gamma = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    _prepare_kernel[(NT, B * H)](
        k, v, g, beta, gamma, w, u, T, H=H, K=K, V=V, BT=BT, BK=BK_TILE, BV=min(64, max(16, triton.next_power_of_2(V))),
        PRECISION=precision, DT=dot_dtype,
    )

    hs = q.new_empty(B, NT, H, K, V)
    v_new = torch.empty_like(u)
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    state_args = (k, w, u, gamma, h0, hs, v_new, ht, T, NT)
    state_meta = dict(H=H, K=K, V=V, BT=BT, BK=BK, HAS_INITIAL=h0 is not None, STORE_FINAL=output_final_state, PRECISION=precision, DT=dot_dtype)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)  # noqa: E731
    if INTERPRETED:
        _state_kernel[grid](*state_args, **state_meta, BV=min(32, max(16, triton.next_power_of_2(V))))
    else:
        _state_kernel[grid](*state_args, **state_meta)

    o = torch.empty_like(v)
    out_args = (q, k, v_new, gamma, hs, o, scale, T, NT)
    out_meta = dict(H=H, K=K, V=V, BT=BT, BK=BK_TILE, PRECISION=precision, DT=dot_dtype)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), NT, B * H)  # noqa: E731
    if INTERPRETED:
        _output_kernel[grid](*out_args, **out_meta, BV=min(64, max(16, triton.next_power_of_2(V))))
    else:
        _output_kernel[grid](*out_args, **out_meta)
    return o, ht


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state):
        o, ht = _chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale = scale
        ctx.output_final_state = output_final_state
        if ht is not None:
            return o, ht
        return o, None

    @staticmethod
    def backward(ctx, do, dht):
        # recomputation through the differentiable reference: exact, but at the reference's cost
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta)]
        h0 = initial_state.detach().requires_grad_(True) if initial_state is not None else None
        with torch.enable_grad():
            o, ht = chunk_gated_delta_rule_ref(*inputs, ctx.scale, h0, ctx.output_final_state)
            outputs, grads_out = [o], [do]
            if ht is not None and dht is not None:
                outputs.append(ht)
                grads_out.append(dht)
            wrt = inputs + ([h0] if h0 is not None else [])
            grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)
        dq, dk, dv, dg, dbeta = grads[:5]
        dh0 = grads[5] if h0 is not None else None
        return dq, dk, dv, dg, dbeta, None, dh0, None


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Chunked gated delta rule on the GPU, differentiable. Returns (o in v's dtype, fp32 final state or None)."""
    _check_launchable(q)
    _check_shapes(q, k, v, g, beta, initial_state)
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    o, ht = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state)
    return o.to(out_dtype), ht
