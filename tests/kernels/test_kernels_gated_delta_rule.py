"""The Triton gated-delta-rule kernels against the project's references and fla-core's naive ones."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (see conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hydrabrain.inference import ops  # noqa: E402
from hydrabrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule  # noqa: E402
from hydrabrain.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule  # noqa: E402
from hydrabrain.kernels.gated_delta_rule.naive import (  # noqa: E402
    chunk_gated_delta_rule_ref,
    recurrent_gated_delta_rule_ref,
)

# relative error ||got - want|| / ||want||; fp32 kernels land near 1e-6
FP32_OUTPUT_RTOL = 1e-5
FP32_STATE_RTOL = 1e-5
# gradients of q, k, v, g, beta and the initial state, against autograd through the token-by-token reference
FP32_GRAD_RTOL = 1e-4
# bf16 inputs, fp32 state: the chunk intermediates (W, U, chunk states) are kept in bf16
BF16_OUTPUT_RTOL = 2e-2
BF16_STATE_RTOL = 2e-2

LENGTHS = (1, 63, 130)
DIMS = ((16, 60), (60, 16))  # (K, V)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def make_inputs(B, T, H, K, V, *, with_state, dtype=torch.float32, seed=0, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)  # GDN feeds L2-normalized keys
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen)) * decay_scale
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if with_state else None
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return q, k, v, g, beta, h0


KERNELS = {
    "fused_recurrent": fused_recurrent_gated_delta_rule,
    "chunk": chunk_gated_delta_rule,
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("K,V", DIMS, ids=lambda d: str(d))
@pytest.mark.parametrize("T", LENGTHS)
def test_each_kernel_matches_the_token_by_token_reference_in_fp32(kernel, T, K, V, with_state):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, K, V, with_state=with_state, seed=T + K)
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, True)
    o_ref, ht_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    assert o.shape == o_ref.shape and o.dtype == v.dtype
    assert ht.shape == ht_ref.shape and ht.dtype == torch.float32
    assert rel_err(o, o_ref) < FP32_OUTPUT_RTOL
    assert rel_err(ht, ht_ref) < FP32_STATE_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("T", [63, 130])
def test_each_kernel_matches_fla_naive_reference_with_a_custom_scale(kernel, T):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    q, k, v, g, beta, h0 = make_inputs(1, T, 3, 60, 16, with_state=True, seed=7)
    o, ht = KERNELS[kernel](q, k, v, g, beta, 0.3, h0, True)
    # fla's naive reference takes beta before g
    o_fla, ht_fla = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_fla) < FP32_OUTPUT_RTOL
    assert rel_err(ht, ht_fla) < FP32_STATE_RTOL


def test_the_chunk_kernel_matches_the_chunked_reference_across_several_chunks():
    q, k, v, g, beta, h0 = make_inputs(1, 200, 2, 60, 60, with_state=True, seed=3)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    o_ref, ht_ref = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    assert rel_err(o, o_ref) < FP32_OUTPUT_RTOL
    assert rel_err(ht, ht_ref) < FP32_STATE_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_a_final_state_is_returned_only_when_asked_for(kernel):
    q, k, v, g, beta, h0 = make_inputs(1, 63, 2, 16, 16, with_state=True)
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, False)
    o_ref, _ = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, False)
    assert ht is None
    assert rel_err(o, o_ref) < FP32_OUTPUT_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_an_empty_sequence_passes_the_state_through(kernel):
    q, k, v, g, beta, h0 = make_inputs(2, 0, 2, 16, 60, with_state=True)
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, True)
    assert o.shape == (2, 0, 2, 60)
    assert torch.equal(ht, h0)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_steep_decay_neither_overflows_nor_loses_the_state(kernel):
    # gamma spans hundreds of nats inside a chunk: exp(gamma_i - gamma_j) above the diagonal would overflow
    q, k, v, g, beta, h0 = make_inputs(1, 130, 2, 16, 60, with_state=True, seed=11, decay_scale=8.0)
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, True)
    o_ref, ht_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert rel_err(o, o_ref) < FP32_OUTPUT_RTOL
    assert rel_err(ht, ht_ref) < FP32_STATE_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_near_parallel_keys_with_full_beta_keep_the_chunk_inverse_exact(kernel):
    # (I + A) is then close to all-ones below the diagonal: a series for its inverse would cancel wildly
    q, k, v, g, beta, h0 = make_inputs(1, 130, 2, 60, 16, with_state=True, seed=17)
    k = F.normalize(k[:, :1].expand_as(k) + 1e-3 * k, dim=-1)
    beta = torch.ones_like(beta)
    g = g * 0.01
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, True)
    o_ref, ht_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    assert rel_err(o, o_ref) < FP32_OUTPUT_RTOL
    assert rel_err(ht, ht_ref) < FP32_STATE_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_bf16_inputs_keep_an_fp32_state_and_stay_close_to_the_reference(kernel):
    q, k, v, g, beta, h0 = make_inputs(1, 130, 2, 60, 60, with_state=True, dtype=torch.bfloat16, seed=5)
    o, ht = KERNELS[kernel](q, k, v, g, beta, None, h0, True)
    o_ref, ht_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert rel_err(o, o_ref) < BF16_OUTPUT_RTOL
    assert rel_err(ht, ht_ref) < BF16_STATE_RTOL


@pytest.mark.parametrize(
    "T,K,V,with_state,decay_scale",
    [(1, 16, 60, True, 1.0), (63, 60, 16, False, 1.0), (130, 16, 60, True, 1.0), (130, 60, 60, False, 1.0), (63, 16, 16, True, 8.0)],
    ids=["T1", "T63", "T130-state", "T130", "T63-steep-decay"],
)
def test_the_chunk_kernel_backward_matches_autograd_through_the_token_by_token_reference(T, K, V, with_state, decay_scale):
    inputs = make_inputs(2, T, 2, K, V, with_state=with_state, seed=13 + T, decay_scale=decay_scale)
    ours = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    theirs = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(2, T, 2, V, generator=gen)
    dht = torch.randn(2, 2, K, V, generator=gen)

    o, ht = chunk_gated_delta_rule(*ours[:5], None, ours[5], True)
    ((o * do).sum() + (ht * dht).sum()).backward()
    o_ref, ht_ref = recurrent_gated_delta_rule_ref(*theirs[:5], None, theirs[5], True)
    ((o_ref * do).sum() + (ht_ref * dht).sum()).backward()

    names = ("q", "k", "v", "g", "beta", "initial_state")
    for name, a, b in zip(names, ours, theirs, strict=True):
        if a is not None:
            assert torch.isfinite(a.grad).all(), name
            assert rel_err(a.grad, b.grad) < FP32_GRAD_RTOL, name


def test_the_chunk_kernel_backward_works_when_only_the_output_is_used():
    inputs = make_inputs(1, 63, 2, 16, 16, with_state=False, seed=21)
    ours = [x.clone().requires_grad_(True) for x in inputs[:5]]
    theirs = [x.clone().requires_grad_(True) for x in inputs[:5]]
    chunk_gated_delta_rule(*ours, None, None, False)[0].square().sum().backward()
    recurrent_gated_delta_rule_ref(*theirs, None, None, False)[0].square().sum().backward()
    for name, a, b in zip(("q", "k", "v", "g", "beta"), ours, theirs, strict=True):
        assert rel_err(a.grad, b.grad) < FP32_GRAD_RTOL, name


def test_the_seam_runs_the_triton_kernels_when_told_to():
    q, k, v, g, beta, h0 = make_inputs(1, 63, 2, 16, 16, with_state=True, seed=2)
    with ops.use("triton"):
        o_chunk, ht_chunk = ops.chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True)
        o_rec, ht_rec = ops.fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    # bitwise equal to the direct calls: the seam added nothing and picked the Triton code
    assert torch.equal(o_chunk, chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True)[0])
    assert torch.equal(o_rec, fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True)[0])
    with ops.use("reference"):
        o_ref, ht_ref = ops.chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True)
    assert rel_err(o_chunk, o_ref) < FP32_OUTPUT_RTOL and rel_err(ht_chunk, ht_ref) < FP32_STATE_RTOL
    assert rel_err(o_rec, o_ref) < FP32_OUTPUT_RTOL and rel_err(ht_rec, ht_ref) < FP32_STATE_RTOL


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_mismatched_shapes_are_refused_with_the_expected_layout(kernel):
    q, k, v, g, beta, _ = make_inputs(1, 8, 2, 16, 16, with_state=False)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        KERNELS[kernel](q, k, v, g[:, :4], beta, None, None, False)
    with pytest.raises(ValueError, match="initial_state"):
        KERNELS[kernel](q, k, v, g, beta, None, torch.zeros(1, 2, 16, 8), False)
