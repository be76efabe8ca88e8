"""Pure-torch references of the gated delta rule (Yang et al., arXiv 2412.06464).

The recurrence, per batch row and head, with a state ``S`` of shape (K, V):

    S_t = exp(g_t) * S_{t-1}
    u_t = beta_t * (v_t - S_t^T k_t)          # the delta: what the state gets wrong about v_t
    S_t = S_t + k_t u_t^T
    o_t = S_t^T (scale * q_t)

Shapes (as fla): q, k ``(B, T, H, K)``; v ``(B, T, H, V)``; g (log-space decay, <= 0) and beta
``(B, T, H)``; initial and final state ``(B, H, K, V)``. All arithmetic runs in fp32 whatever the
input dtype; ``o`` comes back in ``v``'s dtype, the final state in fp32. ``scale`` defaults to
``K ** -0.5``. Both functions take the same arguments in the same order as the Triton kernels, so
either can stand in for them, and both are differentiable (the chunked one is the fast CPU path
for training).
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64


def _check(q, k, v, g, beta, initial_state) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, T, H, K); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = {(B, T, H)}; got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{name} must be (B, T, H) = {(B, T, H)}; got {tuple(t.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be (B, H, K, V) = {(B, H, K, v.shape[-1])}; got {tuple(initial_state.shape)}")


def recurrent_gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token by token: the definition itself. Returns (o, final_state or None)."""
    _check(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    f32, out_dtype = torch.float32, v.dtype
    q, k, v, g, beta = (x.to(f32) for x in (q, k, v, g, beta))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(f32)
    outputs = []
    for t in range(T):
        state = state * g[:, t].exp()[..., None, None]  # (B, H, K, V)
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])  # (B, H, V)
        delta = beta[:, t, :, None] * (v[:, t] - predicted)  # (B, H, V)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]  # (B, H, K, V)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t] * scale))  # (B, H, V)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)  # (B, T, H, V)
    return o.to(out_dtype), (state if output_final_state else None)


def chunk_gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Chunk by chunk (64 tokens) in WY / UT-transform form. Returns (o, final_state or None).

    Inside a chunk, with gamma_i the cumulative log decay from the chunk start, every delta u_i
    depends on the earlier deltas of the same chunk through a strictly lower-triangular matrix
    A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j, so (I + A) u = beta (v - exp(gamma) K S_0).
    One unit-triangular solve per chunk (the UT transform) gives U = T beta V and W = T beta
    exp(gamma) K with u = U - W S_0; the only sequential part left is the state hand-off between
    chunks.
    """
    _check(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = CHUNK_SIZE
    scale = K**-0.5 if scale is None else scale
    f32 = torch.float32
    # (B, H, T, D): heads ahead of time so each chunk is a batch of small matrices
    q, k, v = (x.to(f32).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.to(f32).transpose(1, 2) for x in (g, beta))  # (B, H, T)
    pad = (-T) % C
    if pad:
        # zero beta and zero decay on the padding: those steps leave the state untouched
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (torch.nn.functional.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # (B, H, N, C, D)
    g, beta = (x.reshape(B, H, N, C) for x in (g, beta))  # (B, H, N, C)

    gamma = g.cumsum(-1)  # (B, H, N, C) log decay from the chunk start through position i
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(gamma_i - gamma_j) for j <= i; masked before exp so the upper half cannot overflow
    gap = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
    decay = gap.exp()  # (B, H, N, C, C), zero above the diagonal

    strictly = ~torch.eye(C, dtype=torch.bool, device=q.device) & causal
    A = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))).masked_fill(~strictly, 0.0)  # (B, H, N, C, C)
    eye = torch.eye(C, dtype=f32, device=q.device)
    unit_lower = A + eye
    # one solve for both right-hand sides: U = T beta V and W = T beta exp(gamma) K
    rhs = torch.cat([beta[..., None] * v, (beta * gamma.exp())[..., None] * k], dim=-1)  # (B, H, N, C, V + K)
    U, W = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    qs = q * scale
    intra = (qs @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C), causal incl. diagonal
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(f32)
    outputs = []
    for n in range(N):
        u = U[:, :, n] - W[:, :, n] @ state  # (B, H, C, V)
        o = (qs[:, :, n] * gamma[:, :, n, :, None].exp()) @ state + intra[:, :, n] @ u  # (B, H, C, V)
        outputs.append(o)
        tail = (gamma[:, :, n, -1:] - gamma[:, :, n]).exp()  # (B, H, C) decay from i to the chunk end
        state = state * gamma[:, :, n, -1, None, None].exp() + (k[:, :, n] * tail[..., None]).transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T]  # (B, H, T, V)
    o = o.transpose(1, 2).to(out_dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)
