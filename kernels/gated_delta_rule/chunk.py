"""Gated delta rule over whole sequences in 64-token chunks (WY / UT transform), in Triton.

Three launches, the same split the chunked algorithm itself suggests:

1. ``_prepare_kernel`` (one program per chunk and head, all parallel): the chunk-local cumulative
   log decay gamma, the strictly lower-triangular A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j, its
   unit-triangular inverse T = (I + A)^-1 by recursive doubling of 2 x 2 block inverses, then
   W = T (beta exp(gamma) K) and U = T (beta V).
2. ``_state_kernel`` (one program per head and V slice, sequential over chunks): the only
   recurrence left. It records the state at each chunk start and the corrected deltas
   U - W S, and carries S to the next chunk.
3. ``_output_kernel`` (one program per chunk, head and V slice, all parallel):
   o = scale (exp(gamma) Q) S + causal(scale Q K^T * decay) (U - W S).

The backward is three more launches after recomputing passes 1 and 2 (keeping T this time):
``_bwd_state_kernel`` walks the chunks in reverse and carries dS, the gradient reaching each chunk's
end state, and the gradient of U - W S; then, every chunk in parallel, ``_bwd_dqk_kernel``
differentiates what reads the states (the output block and the state hand-off: all of dq, part of
dk and d(gamma), and dW), and ``_bwd_wy_kernel`` goes back through U, W and the inverse
(dA = -T^T dT T^T), ending with a reverse running sum inside the chunk from d(gamma) to dg. The
split keeps each kernel's tiles within the register file. Same signature and argument
order as the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydrabrain.kernels.gated_delta_rule.fused_recurrent import INTERPRETED, _check_launchable, _maybe_autotune

CHUNK = 64


@_maybe_autotune(configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)], key=["K", "V"])
@triton.jit
def _prepare_kernel(
    k, v, g, beta, gamma, w, u, a_inv,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
    DT: tl.constexpr,
    STORE_INV: tl.constexpr,
    LOG_BT: tl.constexpr,
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
    # padding rows and columns too: their gamma is 0, which would make the gaps positive
    strictly_lower = (o_i[:, None] > o_i[None, :]) & m_t[:, None] & m_t[None, :]
    # masked before exp: above the diagonal gamma_i - gamma_j is positive and may overflow
    gap = tl.where(strictly_lower, b_gamma[:, None] - b_gamma[None, :], float("-inf"))
    b_a = tl.where(strictly_lower, b_beta[:, None] * b_kk * tl.exp(gap), 0.0)

    # (I + A)^-1 by recursive doubling of exact 2 x 2 block inverses, at block sizes 1, 2, ..., BT/2:
    # [[X1, 0], [C, X2]]^-1 = [[X1^-1, 0], [-X2^-1 C X1^-1, X2^-1]], that is X <- X - X C X where C
    # holds A's entries below the diagonal blocks of the current size. Every step is exact, so it is
    # as tame as forward substitution (unlike a Neumann-series product, whose terms cancel
    # catastrophically for near-parallel keys), and it is 2 log2(BT) tile products instead of BT
    # serial row updates.
    b_inv = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for lvl in tl.static_range(LOG_BT):
        same_pair = (o_i[:, None] >> (lvl + 1)) == (o_i[None, :] >> (lvl + 1))
        other_half = (o_i[:, None] >> lvl) != (o_i[None, :] >> lvl)
        b_c = tl.where(same_pair & other_half, b_a, 0.0)
        # fp32 operands: single-pass tf32 for half inputs errs ~1e-4, below the bf16 cast of T below
        b_xc = tl.dot(b_inv, b_c, input_precision=PRECISION)
        b_inv = b_inv - tl.dot(b_xc, b_inv, input_precision=PRECISION)
    if STORE_INV:
        # (B, T, H, BT): each token's row of its chunk's inverse, for the backward
        tl.store(a_inv + row[:, None] * BT + o_i[None, :], b_inv, mask=m_t[:, None])
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
    configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=s) for bv in (32, 64) for nw in (4, 8) for s in (1, 2)],
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
    configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=s) for bv in (32, 64) for nw in (4, 8) for s in (1, 2)],
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
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    gap = tl.where(causal, b_gamma[:, None] - b_gamma[None, :], float("-inf"))
    b_a = tl.where(causal, b_qk * tl.exp(gap) * scale, 0.0)
    b_vn = tl.load(v_new + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o += tl.dot(b_a.to(DT), b_vn.to(DT), input_precision=PRECISION)
    tl.store(o + row[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=nw, num_stages=s) for bv in (32, 64) for nw in (4, 8) for s in (1, 2)],
    key=["K", "V"],
)
@triton.jit
def _bwd_state_kernel(
    q, k, w, gamma, do, dht, dh0, dhs, dvn,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr,
    DT: tl.constexpr,
):
    # chunks in reverse: the gradient reaching each chunk's end state, and the one reaching U - W S
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_i = tl.arange(0, BT)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)

    for i_n in range(0, NT):
        i_t = NT - 1 - i_n
        p_dhs = dhs + ((i_b * NT + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_dhs, b_dh, mask=m_kv)

        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        row = (i_b * T + o_t) * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        last = tl.minimum(T, (i_t + 1) * BT) - 1
        b_glast = tl.load(gamma + (i_b * T + last) * H + i_h)
        b_gamma = tl.load(gamma + row, mask=m_t, other=0.0)
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)

        valid = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
        gap = tl.where(valid, b_gamma[:, None] - b_gamma[None, :], float("-inf"))
        b_m = tl.dot(b_q.to(DT), tl.trans(b_k.to(DT)), input_precision=PRECISION) * tl.exp(gap) * scale
        b_m = tl.where(valid, b_m, 0.0)
        b_tail = tl.where(m_t, tl.exp(b_glast - b_gamma), 0.0)
        b_kd = b_k * b_tail[:, None]
        # U - W S feeds the output (through the causal block) and the next state (through the decayed keys)
        b_dvn = tl.dot(b_kd.to(DT), b_dh.to(DT), input_precision=PRECISION)
        b_dvn += tl.dot(tl.trans(b_m).to(DT), b_do.to(DT), input_precision=PRECISION)
        tl.store(dvn + row[:, None] * V + o_v[None, :], b_dvn, mask=m_tv)

        b_qg = b_q * (tl.where(m_t, tl.exp(b_gamma), 0.0) * scale)[:, None]
        b_dh = b_dh * tl.exp(b_glast)
        b_dh += tl.dot(tl.trans(b_qg).to(DT), b_do.to(DT), input_precision=PRECISION)
        b_dh -= tl.dot(tl.trans(b_w).to(DT), b_dvn.to(DT), input_precision=PRECISION)

    if STORE_DH0:
        tl.store(dh0 + i_bh * K * V + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_kv)


# the backward's per-chunk kernels hold several full-K gradient tiles: only 8-warp CTAs keep them
# in registers (per ptxas at K = 64; at K = 128 a few hundred bytes still spill)
@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=8, num_stages=s) for bv in (16, 32, 64) for s in (1, 2)],
    key=["K", "V"],
)
@triton.jit
def _bwd_dqk_kernel(
    q, k, gamma, hs, dhs, v_new, dvn, do,
    dq, dk_part, dw, dgamma_part,
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
    # one chunk, all parallel: everything that reads the states S and dS' (dq in full, the output-block
    # and hand-off parts of dk and dgamma, and dW for the WY kernel)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    row = (i_b * T + o_t) * H + i_h
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    o_i = tl.arange(0, BT)

    b_gamma = tl.load(gamma + row, mask=m_t, other=0.0)
    last = tl.minimum(T, (i_t + 1) * BT) - 1
    b_glast = tl.load(gamma + (i_b * T + last) * H + i_h)

    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)  # d(decayed keys) = (U - W S) dS'^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # -d(U - W S) S^T
    b_dm = tl.zeros([BT, BT], dtype=tl.float32)  # d(causal block) = dO (U - W S)^T
    b_sds = tl.zeros([BK], dtype=tl.float32)  # row sums of S * dS', for the chunk's total decay
    p_state = ((i_b * NT + i_t) * H + i_h) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_s = tl.load(hs + p_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(tl.float32)
        b_ds = tl.load(dhs + p_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
        b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        b_vn = tl.load(v_new + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        b_dvn = tl.load(dvn + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(DT)
        b_st = tl.trans(b_s).to(DT)
        b_dqs += tl.dot(b_do, b_st, input_precision=PRECISION)
        b_dw -= tl.dot(b_dvn, b_st, input_precision=PRECISION)
        b_dm += tl.dot(b_do, tl.trans(b_vn), input_precision=PRECISION)
        b_dkd += tl.dot(b_vn, tl.trans(b_ds).to(DT), input_precision=PRECISION)
        b_sds += tl.sum(b_s * b_ds, axis=1)
    tl.store(dw + row[:, None] * K + o_k[None, :], b_dw, mask=m_tk)

    b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    incl = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_decay = tl.exp(tl.where(incl, b_gamma[:, None] - b_gamma[None, :], float("-inf")))  # 0 off the causal part
    b_eg = tl.where(m_t, tl.exp(b_gamma), 0.0)

    # the causal block M = scale (Q K^T) * decay, and the inter-chunk read scale (exp(gamma) Q) S
    b_dme = tl.where(incl, b_dm, 0.0) * b_decay * scale
    b_dq = tl.dot(b_dme.to(DT), b_k.to(DT), input_precision=PRECISION) + b_dqs * (b_eg * scale)[:, None]
    tl.store(dq + row[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    b_qk = tl.dot(b_q.to(DT), tl.trans(b_k).to(DT), input_precision=PRECISION)
    b_p = b_dme * b_qk  # dM * M
    b_dgamma = tl.sum(b_p, axis=1) - tl.sum(b_p, axis=0)
    b_dgamma += tl.sum(b_q.to(tl.float32) * b_dqs, axis=1) * b_eg * scale
    b_dk = tl.dot(tl.trans(b_dme).to(DT), b_q.to(DT), input_precision=PRECISION)

    # the hand-off to the next chunk: S' = exp(gamma_last) S + (K * exp(gamma_last - gamma))^T (U - W S)
    b_tail = tl.where(m_t, tl.exp(b_glast - b_gamma), 0.0)
    b_dk += b_dkd * b_tail[:, None]
    b_dtail = tl.sum(b_dkd * b_k.to(tl.float32), axis=1) * b_tail
    b_dgamma -= b_dtail
    b_dglast = tl.sum(b_dtail, axis=0) + tl.exp(b_glast) * tl.sum(b_sds, axis=0)
    b_dgamma += tl.where(o_t == last, b_dglast, 0.0)
    tl.store(dk_part + row[:, None] * K + o_k[None, :], b_dk, mask=m_tk)
    tl.store(dgamma_part + row, b_dgamma, mask=m_t)


@_maybe_autotune(
    configs=[triton.Config({"BV": bv}, num_warps=8, num_stages=s) for bv in (16, 32, 64) for s in (1, 2)],
    key=["K", "V"],
)
@triton.jit
def _bwd_wy_kernel(
    k, v, beta, gamma, a_inv, dvn, dw, dk_part, dgamma_part,
    dk, dv, dbeta, dg,
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
    # one chunk, all parallel: back through U = T (beta V), W = T (beta exp(gamma) K) and T = (I + A)^-1,
    # then from d(gamma) to dg by a reverse running sum inside the chunk
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    row = (i_b * T + o_t) * H + i_h
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    o_i = tl.arange(0, BT)

    b_beta = tl.load(beta + row, mask=m_t, other=0.0).to(tl.float32)
    b_gamma = tl.load(gamma + row, mask=m_t, other=0.0)
    b_inv_t = tl.trans(tl.load(a_inv + row[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)).to(DT)

    b_dinv = tl.zeros([BT, BT], dtype=tl.float32)  # d(I + A)^-1
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_dvn = tl.load(dvn + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        # dU is the gradient of U - W S
        b_dinv += tl.dot(b_dvn.to(DT), tl.trans(b_v * b_beta[:, None]).to(DT), input_precision=PRECISION)
        b_dbv = tl.dot(b_inv_t, b_dvn.to(DT), input_precision=PRECISION)
        tl.store(dv + row[:, None] * V + o_v[None, :], (b_dbv * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        b_dbeta += tl.sum(b_dbv * b_v, axis=1)

    b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
    b_dw = tl.load(dw + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_eg = tl.where(m_t, tl.exp(b_gamma), 0.0)
    b_kscale = b_beta * b_eg
    b_dkb = tl.dot(b_inv_t, b_dw.to(DT), input_precision=PRECISION)
    b_dk = tl.load(dk_part + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0) + b_dkb * b_kscale[:, None]
    b_dks = tl.sum(b_dkb * b_k, axis=1)
    b_dbeta += b_dks * b_eg
    b_dgamma = tl.load(dgamma_part + row, mask=m_t, other=0.0) + b_dks * b_kscale
    b_dinv += tl.dot(b_dw.to(DT), tl.trans(b_k * b_kscale[:, None]).to(DT), input_precision=PRECISION)

    # T = (I + A)^-1, so dA = -T^T dT T^T, kept on the strictly lower part where A lives
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_da = tl.dot(b_dinv.to(DT), b_inv_t, input_precision=PRECISION)
    b_da = -tl.dot(b_inv_t, b_da.to(DT), input_precision=PRECISION)
    b_decay = tl.exp(tl.where(strict, b_gamma[:, None] - b_gamma[None, :], float("-inf")))
    b_da = tl.where(strict, b_da, 0.0) * b_decay  # dA_ij exp(gamma_i - gamma_j)
    b_kk = tl.dot(b_k.to(DT), tl.trans(b_k).to(DT), input_precision=PRECISION)
    b_dae = b_da * b_kk
    b_dbeta += tl.sum(b_dae, axis=1)
    b_p = b_dae * b_beta[:, None]  # dA * A
    b_dgamma += tl.sum(b_p, axis=1) - tl.sum(b_p, axis=0)
    b_dkk = (b_da * b_beta[:, None]).to(DT)
    b_kdt = b_k.to(DT)
    b_dk += tl.dot(b_dkk, b_kdt, input_precision=PRECISION)
    b_dk += tl.dot(tl.trans(b_dkk), b_kdt, input_precision=PRECISION)

    # gamma is the running sum of g inside the chunk
    b_dg = tl.cumsum(b_dgamma, axis=0, reverse=True)
    tl.store(dk + row[:, None] * K + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dbeta + row, b_dbeta, mask=m_t)
    tl.store(dg + row, b_dg, mask=m_t)


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


def _launch(kernel, grid, args, meta, fixed):
    """Autotuned on a GPU; the interpreter gets the fixed meta-parameters instead."""
    if INTERPRETED:
        kernel[grid](*args, **meta, **fixed)
    else:
        kernel[grid](*args, **meta)


def _chunk_states(q, k, v, g, beta, initial_state, output_final_state, *, keep_inverse=False):
    """The prepare and state passes: everything but the output. Inputs already contiguous, one dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = CHUNK
    NT = triton.cdiv(T, BT)
    # fp32 inputs get true fp32 products; half inputs run the tensor cores in their own type
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # the interpreter multiplies half-precision tiles as raw integer bits: keep its products in fp32
    dot_dtype = tl.float32 if INTERPRETED or q.dtype == torch.float32 else {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]
    BK = max(16, triton.next_power_of_2(K))
    BV_MAX = max(16, triton.next_power_of_2(V))
    c = dict(B=B, T=T, H=H, K=K, V=V, BT=BT, NT=NT, BK=BK, BV_MAX=BV_MAX, precision=precision, dot_dtype=dot_dtype)

    gamma = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    a_inv = torch.empty(B, T, H, BT, device=q.device, dtype=torch.float32) if keep_inverse else None
    _prepare_kernel[(NT, B * H)](
        k, v, g, beta, gamma, w, u, a_inv, T, H=H, K=K, V=V, BT=BT, BK=min(64, BK), BV=min(64, BV_MAX),
        PRECISION=precision, DT=dot_dtype, STORE_INV=keep_inverse, LOG_BT=BT.bit_length() - 1,
    )

    hs = q.new_empty(B, NT, H, K, V)
    v_new = torch.empty_like(u)
    ht = q.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    _launch(
        _state_kernel,
        lambda meta: (triton.cdiv(V, meta["BV"]), B * H),
        (k, w, u, gamma, h0, hs, v_new, ht, T, NT),
        dict(H=H, K=K, V=V, BT=BT, BK=BK, HAS_INITIAL=h0 is not None, STORE_FINAL=output_final_state, PRECISION=precision, DT=dot_dtype),
        dict(BV=min(32, BV_MAX)),
    )
    return c, dict(gamma=gamma, w=w, u=u, a_inv=a_inv, hs=hs, v_new=v_new, ht=ht)


def _chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state):
    c, s = _chunk_states(q, k, v, g, beta, initial_state, output_final_state)
    B, T, H, K, V, NT = c["B"], c["T"], c["H"], c["K"], c["V"], c["NT"]
    o = torch.empty_like(v)
    _launch(
        _output_kernel,
        lambda meta: (triton.cdiv(V, meta["BV"]), NT, B * H),
        (q, k, s["v_new"], s["gamma"], s["hs"], o, scale, T, NT),
        dict(H=H, K=K, V=V, BT=c["BT"], BK=min(64, c["BK"]), PRECISION=c["precision"], DT=c["dot_dtype"]),
        dict(BV=min(64, c["BV_MAX"])),
    )
    return o, s["ht"]


def _chunk_backward(q, k, v, g, beta, scale, initial_state, do, dht):
    # the forward's intermediates are recomputed, not kept: two cheap passes instead of (B, NT, H, K, V) held
    c, s = _chunk_states(q, k, v, g, beta, initial_state, False, keep_inverse=True)
    B, T, H, K, V, NT = c["B"], c["T"], c["H"], c["K"], c["V"], c["NT"]
    common = dict(H=H, K=K, V=V, BT=c["BT"], BK=c["BK"], PRECISION=c["precision"], DT=c["dot_dtype"])
    do = do.to(v.dtype).contiguous()
    dht = dht.contiguous() if dht is not None else None
    dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if initial_state is not None else None
    dhs = torch.empty(B, NT, H, K, V, device=q.device, dtype=torch.float32)
    dvn = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    _launch(
        _bwd_state_kernel,
        lambda meta: (triton.cdiv(V, meta["BV"]), B * H),
        (q, k, s["w"], s["gamma"], do, dht, dh0, dhs, dvn, scale, T, NT),
        dict(**common, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None),
        dict(BV=min(32, c["BV_MAX"])),
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dk_part = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    dw = torch.empty_like(dk_part)
    dgamma_part = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    _launch(
        _bwd_dqk_kernel,
        (NT, B * H),
        (q, k, s["gamma"], s["hs"], dhs, s["v_new"], dvn, do, dq, dk_part, dw, dgamma_part, scale, T, NT),
        common,
        dict(BV=min(32, c["BV_MAX"])),
    )
    dbeta = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    dg = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    _launch(
        _bwd_wy_kernel,
        (NT, B * H),
        (k, v, beta, s["gamma"], s["a_inv"], dvn, dw, dk_part, dgamma_part, dk, dv, dbeta, dg, T),
        common,
        dict(BV=min(32, c["BV_MAX"])),
    )
    return dq, dk, dv, dg, dbeta, dh0


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state):
        dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        # one dtype for q, k, v keeps every tile product in one type
        q, k, v = q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        g, beta = g.contiguous(), beta.contiguous()
        o, ht = _chunk_forward(q, k, v, g, beta, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.dtypes = scale, dtypes
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        grads = _chunk_backward(q, k, v, g, beta, ctx.scale, initial_state, do, dht)
        dq, dk, dv, dg, dbeta = (x.to(dtype) for x, dtype in zip(grads[:5], ctx.dtypes, strict=True))
        return dq, dk, dv, dg, dbeta, None, grads[5], None


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Chunked gated delta rule on the GPU, differentiable. Returns (o in v's dtype, fp32 final state or None)."""
    _check_launchable(q)
    _check_shapes(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    if T == 0:  # nothing to launch: the state passes through, as in the token-by-token reference
        state = initial_state.to(torch.float32) if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
        return v.new_zeros(B, 0, H, v.shape[-1]), (state if output_final_state else None)
    scale = K**-0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    o, ht = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, initial_state, output_final_state)
    return o.to(out_dtype), ht
