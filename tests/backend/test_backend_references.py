"""The pure-torch references the engine runs on CPU (and the Triton kernels must match)."""

from __future__ import annotations

import math

import torch

from hydrabrain.kernels.kv_compact.naive import kv_compact_ref
from hydrabrain.kernels.paged_attention.naive import paged_decode_attention_ref
from hydrabrain.kernels.triattention_score.naive import triattention_score_ref


def _scatter_sequences(lens: list[int], num_blocks: int, hkv: int, d: int, seed: int = 0):
    """Random caches and block tables whose blocks are shuffled across the pool."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, 16, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, 16, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(math.ceil(n / 16) for n in lens) + 1
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for i in range(math.ceil(n / 16)):
            tables[b, i] = perm.pop()
    return k_cache, v_cache, tables


def _contiguous(cache: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([cache[int(p)] for p in table[: math.ceil(n / 16)]])[:n]


def test_paged_decode_attention_equals_plain_softmax_attention_over_the_gathered_tokens():
    lens = [1, 63, 17, 0, 130]
    hq, hkv, d = 6, 2, 60
    k_cache, v_cache, tables = _scatter_sequences(lens, 40, hkv, d)
    q = torch.randn(len(lens), hq, d)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.125)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros(hq, d))
            continue
        k = _contiguous(k_cache, tables[b], n).repeat_interleave(hq // hkv, dim=1)  # (n, hq, d)
        v = _contiguous(v_cache, tables[b], n).repeat_interleave(hq // hkv, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b], k) * 0.125, dim=-1)
        torch.testing.assert_close(out[b], torch.einsum("hn,nhd->hd", probs, v), atol=1e-5, rtol=1e-5)


def test_kv_compact_moves_each_source_slot_to_its_destination_and_leaves_the_rest():
    k_cache, v_cache, _ = _scatter_sequences([16], 4, 2, 8)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    src = torch.tensor([3, 5, 20, 33], dtype=torch.int32)
    dst = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    kv_compact_ref(k_cache, v_cache, src, dst)
    flat_k, flat_v = k_cache.view(64, 2, 8), v_cache.view(64, 2, 8)
    torch.testing.assert_close(flat_k[:4], before_k.view(64, 2, 8)[src.long()], atol=0, rtol=0)
    torch.testing.assert_close(flat_v[:4], before_v.view(64, 2, 8)[src.long()], atol=0, rtol=0)
    torch.testing.assert_close(flat_k[4:], before_k.view(64, 2, 8)[4:], atol=0, rtol=0)


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    ang = pos[:, None].float() * inv_freq[None]  # (N, D/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def test_triattention_score_with_one_fixed_query_equals_the_true_mean_logit():
    # A head whose queries never vary: the score must be exactly the logit those queries produce.
    torch.manual_seed(0)
    hq, hkv, d, n = 4, 2, 16, 37
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    keys_pre = torch.randn(n, hkv, d)
    keys = _rope(keys_pre, torch.arange(n), inv_freq)
    k_cache, _, tables = _scatter_sequences([n], 8, hkv, d)
    for i in range(n):
        k_cache[int(tables[0, i // 16]), i % 16] = keys[i]
    q = torch.randn(hq, d)
    half = d // 2
    q_abs = torch.sqrt(q[:, :half] ** 2 + q[:, half:] ** 2)
    future = torch.tensor([40.0, 41.0, 50.0])
    scores = triattention_score_ref(k_cache, tables[0], n, q, q_abs, inv_freq, future)
    expected = torch.zeros(hq, n)
    for p in future:
        q_post = _rope(q[None].expand(1, hq, d).reshape(1, hq, d), p.view(1), inv_freq)[0]  # (hq, d)
        expected += torch.einsum("hd,nhd->hn", q_post, keys.repeat_interleave(hq // hkv, dim=1))
    torch.testing.assert_close(scores, expected / len(future), atol=1e-4, rtol=1e-4)
