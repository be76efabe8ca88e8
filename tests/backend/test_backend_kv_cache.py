"""The block pool, the compaction remap and compaction of real K/V tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hydrabrain.inference.kv_cache import BLOCK_SIZE, BlockPool, HostKV, OutOfBlocks, PagedKVCache, blocks_emptied_by_eviction, compaction_remap


def _fill(cache: PagedKVCache, seq_id: str, n: int) -> None:
    """Append n tokens whose K/V encode (sequence, token index, layer) so moves can be traced."""
    start = cache.length(seq_id)
    slots = cache.append_slots(seq_id, n)
    tag = float(hash(seq_id) % 1000)
    for layer in range(len(cache.k)):
        idx = torch.arange(start, start + n, dtype=torch.float32)
        k = (tag * 1e4 + idx * 10 + layer)[:, None, None].expand(n, cache.kv_heads[layer], cache.head_dim)
        cache.write(layer, slots, k, -k)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "compact", "release"]), st.integers(0, 3), st.integers(1, 70)), max_size=40))
def test_block_pool_invariants_hold_under_any_allocate_free_compact_sequence(ops):
    cache = PagedKVCache([1, 2], head_dim=4, num_blocks=24)
    rng = random.Random(0)
    for op, which, n in ops:
        seq = f"s{which}"
        if op == "add" and seq not in cache.seqs:
            cache.add(seq)
        elif op == "grow" and seq in cache.seqs:
            free_before, held_before = cache.pool.num_free, cache.blocks_held(seq)
            try:
                _fill(cache, seq, n)
            except OutOfBlocks:
                # A refused allocation takes nothing.
                assert (cache.pool.num_free, cache.blocks_held(seq)) == (free_before, held_before)
        elif op == "compact" and seq in cache.seqs and cache.length(seq):
            length = cache.length(seq)
            kept = max(1, length * n // 100)
            keeps = [sorted(rng.sample(range(length), kept)) for _ in cache.k]
            free_before = cache.pool.num_free
            freed = cache.compact(seq, keeps)
            assert freed == math.ceil(length / BLOCK_SIZE) - math.ceil(kept / BLOCK_SIZE)
            assert cache.pool.num_free == free_before + freed
        elif op == "release" and seq in cache.seqs:
            cache.release(seq)
        cache.assert_invariants()
    for seq in list(cache.seqs):
        cache.release(seq)
    cache.assert_invariants()
    assert cache.pool.num_free == cache.pool.num_blocks


def test_a_pool_refuses_to_hand_out_more_blocks_than_it_has_and_to_free_twice():
    pool = BlockPool(4)
    taken = pool.allocate(3)
    with pytest.raises(OutOfBlocks, match="1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.share(taken[:1])
    assert pool.free(taken) == 2  # the shared block keeps one reference
    with pytest.raises(ValueError, match="already free"):
        pool.free(taken[1:2])
    assert pool.free(taken[:1]) == 1
    pool.assert_invariants()
    assert pool.num_free == 4


def test_scattered_eviction_frees_almost_no_blocks_while_compaction_frees_them_all():
    cache = PagedKVCache([2], head_dim=4, num_blocks=80)
    cache.add("long")
    _fill(cache, "long", 1024)  # 64 blocks
    scores = torch.rand(1024, generator=torch.Generator().manual_seed(7))
    keep = sorted(torch.topk(scores, 256).indices.tolist())  # keep a quarter, scattered as scores fall
    without_moving = blocks_emptied_by_eviction(1024, keep)
    freed = cache.compact("long", [keep])
    assert without_moving <= 2
    assert freed == 64 - 256 // BLOCK_SIZE == 48
    assert cache.blocks_held("long") == 16 and cache.pool.num_free == 80 - 16


def test_compaction_keeps_the_chosen_keys_and_values_exactly_and_in_token_order_in_every_layer():
    cache = PagedKVCache([2, 3], head_dim=8, num_blocks=40)
    cache.add("other")
    _fill(cache, "other", 20)  # interleave another sequence's blocks so tables are not contiguous
    cache.add("seq")
    for _ in range(5):
        _fill(cache, "seq", 37)
        _fill(cache, "other", 5)
    before = [cache.gather(layer, "seq") for layer in range(2)]
    other_before = [cache.gather(layer, "other") for layer in range(2)]
    rng = random.Random(3)
    keeps = [sorted(rng.sample(range(185), 70)) for _ in range(2)]  # a different choice per layer
    cache.compact("seq", keeps)
    assert cache.length("seq") == 70
    for layer in range(2):
        k, v = cache.gather(layer, "seq")
        assert torch.equal(k, before[layer][0][keeps[layer]])
        assert torch.equal(v, before[layer][1][keeps[layer]])
        assert torch.equal(cache.gather(layer, "other")[0], other_before[layer][0])  # neighbours untouched
    cache.assert_invariants()


def test_the_remap_slides_survivors_forward_inside_the_sequence_own_blocks():
    table = [9, 2, 7, 4]
    remap = compaction_remap(table, 60, [0, 1, 17, 40, 59])
    assert remap.src_slots == [2 * 16 + 1, 7 * 16 + 8, 4 * 16 + 11]
    assert remap.dst_slots == [9 * 16 + 2, 9 * 16 + 3, 9 * 16 + 4]
    assert remap.old_to_new() == dict(zip(remap.src_slots, remap.dst_slots, strict=True))
    assert (remap.new_len, remap.kept_blocks, remap.freed_blocks) == (5, [9], [2, 7, 4])


def test_the_remap_rejects_unsorted_or_out_of_range_choices():
    with pytest.raises(ValueError, match="strictly ascending"):
        compaction_remap([0, 1], 20, [3, 3])
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        compaction_remap([0, 1], 20, [5, 20])
    with pytest.raises(ValueError, match="cannot hold"):
        compaction_remap([0], 20, [1])


@pytest.mark.parametrize(("fmt", "tolerance"), [("float16", 1e-3), ("int8", 1 / 127)])
def test_the_host_tier_gives_rows_back_as_written_to_its_format_precision(fmt, tolerance):
    host = HostKV([2, 0, 2], head_dim=8, capacity=40, fmt=fmt)
    k, v = torch.randn(30, 2, 8) * 5, torch.randn(30, 2, 8)
    host.write(0, 10, k, v)
    got_k, got_v = host.read(0, torch.arange(10, 40))
    assert host.length == 40 and host.k[1] is None  # a layer without K/V heads holds nothing
    for got, want in ((got_k, k), (got_v, v)):
        assert bool(((got - want).abs() <= tolerance * want.abs().amax(-1, keepdim=True) + 1e-6).all())
    fp16 = HostKV([2, 0, 2], head_dim=8, capacity=40).nbytes
    assert host.nbytes == fp16 if fmt == "float16" else host.nbytes == fp16 * (8 + 2) // 16  # int8 rows plus one scale each


def test_an_unknown_host_format_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="float16, int8"):
        HostKV([2], head_dim=8, capacity=4, fmt="int4")
