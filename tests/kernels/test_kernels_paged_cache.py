"""The Triton kernels of the paged KV cache (decode attention, compaction, TriAttention scoring) against their references."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (see conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from hydrabrain.inference import ops  # noqa: E402
from hydrabrain.kernels.kv_compact.naive import kv_compact_ref  # noqa: E402
from hydrabrain.kernels.kv_compact.triton import kv_compact  # noqa: E402
from hydrabrain.kernels.paged_attention.naive import paged_decode_attention_ref  # noqa: E402
from hydrabrain.kernels.paged_attention.triton import paged_decode_attention  # noqa: E402
from hydrabrain.kernels.triattention_score.naive import triattention_score_ref  # noqa: E402
from hydrabrain.kernels.triattention_score.triton import triattention_score  # noqa: E402

# relative error ||got - want|| / ||want|| in fp32
PAGED_FP32_RTOL = 1e-5
SCORE_FP32_RTOL = 1e-5
# bf16 cache and query, softmax in fp32 on both sides
PAGED_BF16_RTOL = 2e-2

BLOCK_SIZE = 16


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def paged_cache(lens, hkv, d, *, seed=0, dtype=torch.float32, num_blocks=48):
    """A cache whose sequences own scattered, shuffled blocks; unused table entries hold junk ids."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(dtype)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens) + 1
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max_blocks), 10_000, dtype=torch.int32)  # never read past a length
    used = 0
    for b, n in enumerate(lens):
        need = -(-n // BLOCK_SIZE)
        tables[b, :need] = order[used : used + need].to(torch.int32)
        used += need
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("d", [16, 60])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3)], ids=["mha", "gqa3"])
def test_paged_decode_matches_the_reference_for_awkward_lengths(hq, hkv, d):
    lens = [1, 63, 130, 0]
    k_cache, v_cache, tables, seq_lens = paged_cache(lens, hkv, d, seed=d + hq)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d**-0.5)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, d**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, want) < PAGED_FP32_RTOL
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # an empty sequence reads nothing


def test_paged_decode_in_bf16_stays_close_to_the_reference():
    k_cache, v_cache, tables, seq_lens = paged_cache([130, 63], 3, 64, seed=4, dtype=torch.bfloat16)
    q = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.125)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, want) < PAGED_BF16_RTOL


def slide_remap(n_tokens: int, keep_every: int, first_block: int, tail_block: int):
    """Survivors of one sequence spread over two blocks slide forward in token order: (src, dst) slots."""
    kept = [t for t in range(n_tokens) if t % keep_every == 0 or t >= n_tokens - 3]
    blocks = [first_block, tail_block]
    slot = lambda t: blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE  # noqa: E731
    src = torch.tensor([slot(t) for t in kept])
    dst = torch.tensor([slot(i) for i in range(len(kept))])
    return src, dst


def test_compaction_moves_exactly_what_the_reference_moves_even_when_targets_were_sources():
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(24, BLOCK_SIZE, 3, 60, generator=gen)
    v_cache = torch.randn(24, BLOCK_SIZE, 3, 60, generator=gen)
    # a shift of one slot: every dst but the first is the src of the token just before it
    src = torch.arange(41, 80)
    dst = torch.arange(40, 79)
    # a second sequence whose later block sits physically before its earlier one: its tail moves to higher slots
    src2, dst2 = slide_remap(32, 3, first_block=7, tail_block=5)
    src, dst = torch.cat([src, src2]), torch.cat([dst, dst2])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    assert kv_compact_ref(want_k, want_v, src, dst) is None
    assert kv_compact(k_cache, v_cache, src.to(torch.int32), dst.to(torch.int32)) is None
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_compaction_with_nothing_to_move_leaves_the_cache_untouched():
    k_cache = torch.randn(4, BLOCK_SIZE, 1, 16)
    v_cache = torch.randn(4, BLOCK_SIZE, 1, 16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    kv_compact(k_cache, v_cache, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    kv_compact(k_cache, v_cache, torch.arange(5), torch.arange(5))  # kept where they are
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


def test_decode_after_compaction_attends_to_exactly_the_surviving_tokens():
    hkv, d = 3, 60
    k_cache, v_cache, tables, seq_lens = paged_cache([130], hkv, d, seed=9)
    q = torch.randn(1, 9, d, generator=torch.Generator().manual_seed(4))
    keep = [t for t in range(130) if t % 4 != 1]  # 97 survivors: the last block goes back to the pool
    pages = tables[0].long()
    slot = lambda t: int(pages[t // BLOCK_SIZE]) * BLOCK_SIZE + t % BLOCK_SIZE  # noqa: E731
    src = torch.tensor([slot(t) for t in keep])
    dst = torch.tensor([slot(i) for i in range(len(keep))])

    # what attention over the survivors alone gives, from a separate cache holding only them
    only_k = k_cache.reshape(-1, hkv, d)[src].reshape(1, len(keep), hkv, d)
    only_v = v_cache.reshape(-1, hkv, d)[src].reshape(1, len(keep), hkv, d)
    pad = -len(keep) % BLOCK_SIZE
    only_k = torch.nn.functional.pad(only_k, (0, 0, 0, 0, 0, pad)).reshape(-1, BLOCK_SIZE, hkv, d)
    only_v = torch.nn.functional.pad(only_v, (0, 0, 0, 0, 0, pad)).reshape(-1, BLOCK_SIZE, hkv, d)
    only_table = torch.arange(only_k.shape[0], dtype=torch.int32)[None]
    want = paged_decode_attention_ref(q, only_k, only_v, only_table, torch.tensor([len(keep)], dtype=torch.int32), d**-0.5)

    kv_compact(k_cache, v_cache, src, dst)
    freed_blocks = -(-130 // BLOCK_SIZE) - (-(-len(keep) // BLOCK_SIZE))
    assert freed_blocks == 2
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([len(keep)], dtype=torch.int32), d**-0.5)
    assert rel_err(out, want) < PAGED_FP32_RTOL


def score_inputs(hq, hkv, d, n, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, _, tables, _ = paged_cache([n], hkv, d, seed=seed)
    q_mean = torch.randn(hq, d, generator=gen)
    half = d // 2
    modulus = torch.sqrt(q_mean[:, :half] ** 2 + q_mean[:, half:] ** 2)
    # some frequencies with more spread than the mean shows, some with none (clamped to zero)
    q_abs_mean = modulus + torch.rand(hq, half, generator=gen) - 0.3
    inv_freq = 10_000.0 ** (-torch.arange(half, dtype=torch.float32) * 2 / d)
    positions = torch.arange(n, n + 128, dtype=torch.float32)
    return k_cache, tables[0], n, q_mean, q_abs_mean, inv_freq, positions


@pytest.mark.parametrize("d", [16, 60])
@pytest.mark.parametrize("n", [1, 63, 130])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (9, 3)], ids=["mha", "gqa3"])
def test_triattention_scores_match_the_reference(hq, hkv, n, d):
    args = score_inputs(hq, hkv, d, n, seed=n + d)
    got = triattention_score(*args)
    want = triattention_score_ref(*args)
    assert got.shape == (hq, n) and got.dtype == torch.float32
    assert rel_err(got, want) < SCORE_FP32_RTOL


def test_the_seam_runs_the_cache_kernels_when_told_to():
    k_cache, v_cache, tables, seq_lens = paged_cache([63, 130], 3, 16, seed=6)
    q = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(6))
    score_args = score_inputs(9, 3, 16, 63, seed=6)
    with ops.use("triton"):
        out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25)
        scores = ops.triattention_score(*score_args)
    assert torch.equal(out, paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25))
    assert torch.equal(scores, triattention_score(*score_args))
    with ops.use("reference"):
        assert rel_err(out, ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.25)) < PAGED_FP32_RTOL
        assert rel_err(scores, ops.triattention_score(*score_args)) < SCORE_FP32_RTOL


def test_bad_cache_arguments_are_refused_with_the_expected_layout():
    k_cache, v_cache, tables, seq_lens = paged_cache([20], 2, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        paged_decode_attention(torch.randn(1, 3, 16), k_cache, v_cache, tables, seq_lens, 0.25)
    with pytest.raises(ValueError, match="same length"):
        kv_compact(k_cache, v_cache, torch.arange(3), torch.arange(2))
    args = list(score_inputs(2, 2, 16, 20))
    args[2] = 10_000
    with pytest.raises(ValueError, match="longer than"):
        triattention_score(*args)
