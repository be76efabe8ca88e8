"""The two gated-delta-rule references agree with each other and with fla-core's naive ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fla.ops.gated_delta_rule import naive as fla_naive  # fla-core is a test dependency: an independent oracle

from hydrabrain.kernels.gated_delta_rule import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref


# One tolerance per dtype for outputs and one for final states (which stay fp32 in both dtypes,
# so only the rounding of the bf16 inputs separates them from the fp32 oracle's path).
OUTPUT_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}
STATE_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-5, rtol=2e-5)}

LENGTHS = (1, 63, 500)
DIMS = ((60, 100), (100, 60), (16, 16))
DTYPES = (torch.float32, torch.bfloat16)


def make_inputs(T: int, K: int, V: int, dtype: torch.dtype, with_state: bool, B: int = 2, H: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 7 * T + K)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)  # the model feeds L2-normalised keys
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen) if with_state else None
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    return q, k, v, g, beta, state


@pytest.mark.parametrize("with_state", (False, True), ids=("no_state", "state"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "bf16"))
@pytest.mark.parametrize("K,V", DIMS, ids=lambda d: str(d))
@pytest.mark.parametrize("T", LENGTHS)
def test_the_chunked_reference_matches_the_recurrent_one_and_fla(T, K, V, dtype, with_state):
    q, k, v, g, beta, h0 = make_inputs(T, K, V, dtype, with_state)
    o_rec, s_rec = recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    o_chunk, s_chunk = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True)
    o_fla, s_fla = fla_naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, None, h0, True)

    assert o_rec.dtype == o_chunk.dtype == dtype
    assert s_rec.dtype == s_chunk.dtype == torch.float32
    assert o_chunk.shape == (2, T, 3, V) and s_chunk.shape == (2, 3, K, V)
    torch.testing.assert_close(o_chunk, o_rec, **OUTPUT_TOL[dtype])
    torch.testing.assert_close(o_rec, o_fla.to(dtype), **OUTPUT_TOL[dtype])
    torch.testing.assert_close(s_chunk, s_rec, **STATE_TOL[dtype])
    torch.testing.assert_close(s_rec, s_fla, **STATE_TOL[dtype])


@pytest.mark.parametrize("T", LENGTHS)
def test_the_chunked_reference_matches_fla_chunked_form(T):
    q, k, v, g, beta, h0 = make_inputs(T, 60, 100, torch.float32, True)
    o, s = chunk_gated_delta_rule_ref(q, k, v, g, beta, 0.3, h0, True)
    o_fla, s_fla = fla_naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, 64, 0.3, h0, True)
    torch.testing.assert_close(o, o_fla, **OUTPUT_TOL[torch.float32])
    torch.testing.assert_close(s, s_fla, **STATE_TOL[torch.float32])


@pytest.mark.parametrize("impl", (recurrent_gated_delta_rule_ref, chunk_gated_delta_rule_ref), ids=("recurrent", "chunk"))
def test_a_sequence_split_in_two_with_the_state_handed_over_equals_the_whole(impl):
    q, k, v, g, beta, _ = make_inputs(130, 16, 24, torch.float32, False)
    whole, final = impl(q, k, v, g, beta, output_final_state=True)
    first, mid = impl(q[:, :70], k[:, :70], v[:, :70], g[:, :70], beta[:, :70], output_final_state=True)
    second, end = impl(q[:, 70:], k[:, 70:], v[:, 70:], g[:, 70:], beta[:, 70:], initial_state=mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, **OUTPUT_TOL[torch.float32])
    torch.testing.assert_close(end, final, **STATE_TOL[torch.float32])


def test_no_final_state_is_returned_unless_asked_for():
    q, k, v, g, beta, h0 = make_inputs(5, 16, 16, torch.float32, True)
    for impl in (recurrent_gated_delta_rule_ref, chunk_gated_delta_rule_ref):
        _, state = impl(q, k, v, g, beta, initial_state=h0)
        assert state is None


def test_the_chunked_reference_passes_gradients_like_the_recurrent_one():
    q, k, v, g, beta, _ = make_inputs(70, 16, 16, torch.float32, False, B=1, H=2)
    grads = []
    for impl in (recurrent_gated_delta_rule_ref, chunk_gated_delta_rule_ref):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta)]
        o, s = impl(*leaves, output_final_state=True)
        (o.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", (recurrent_gated_delta_rule_ref, chunk_gated_delta_rule_ref), ids=("recurrent", "chunk"))
def test_mismatched_shapes_are_refused_with_the_expected_shape_named(impl):
    q, k, v, g, beta, _ = make_inputs(8, 16, 16, torch.float32, False)
    with pytest.raises(ValueError, match=r"beta must be \(B, T, H\)"):
        impl(q, k, v, g, beta[:, :4])
    with pytest.raises(ValueError, match=r"initial_state must be \(B, H, K, V\)"):
        impl(q, k, v, g, beta, initial_state=torch.zeros(2, 3, 16, 8))
