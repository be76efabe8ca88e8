"""The one seam between the model/engine and the kernels.

Every op has a pure-torch reference (``kernels/<op>/naive.py``) and a Triton implementation with the
identical signature. On CUDA tensors the Triton one runs; elsewhere the reference does. Tests force a
choice with ``use("reference" | "triton")`` or the ``HYDRABRAIN_OPS`` variable.

Shared conventions (the paged cache contract):
- ``k_cache``, ``v_cache``: ``(num_blocks, block_size, num_kv_heads, head_dim)``; a slot is
  ``block_id * block_size + offset``.
- ``block_tables``: ``(B, max_blocks)`` int32, the physical blocks of each sequence in order.
- ``seq_lens``: ``(B,)`` int32, the physical number of cached tokens of each sequence.
- GDN: q, k ``(B, T, H, K)``, v ``(B, T, H, V)``, g and beta ``(B, T, H)``, state ``(B, H, K, V)`` fp32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Backend = Literal["auto", "reference", "triton"]
_forced: Backend | None = None


def backend_for(tensor: torch.Tensor) -> Literal["reference", "triton"]:
    choice = _forced or os.environ.get("HYDRABRAIN_OPS", "auto")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        return "triton"
    return "triton" if tensor.is_cuda else "reference"


@contextmanager
def use(choice: Backend) -> Iterator[None]:
    """Force every op to one implementation inside the block (tests, benchmarks)."""
    global _forced
    previous, _forced = _forced, choice
    try:
        yield
    finally:
        _forced = previous


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated delta rule over a whole sequence (prefill/training). Returns (o, final_state or None)."""
    if backend_for(q) == "triton":
        from hydrabrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule as impl
    else:
        from hydrabrain.kernels.gated_delta_rule.naive import chunk_gated_delta_rule_ref as impl
    return impl(q, k, v, g, beta, scale, initial_state, output_final_state)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated delta rule step by step (decode, T small). Returns (o, final_state or None)."""
    if backend_for(q) == "triton":
        from hydrabrain.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule as impl
    else:
        from hydrabrain.kernels.gated_delta_rule.naive import recurrent_gated_delta_rule_ref as impl
    return impl(q, k, v, g, beta, scale, initial_state, output_final_state)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """One query token per sequence against its paged K/V (GQA). q: (B, Hq, D) -> (B, Hq, D)."""
    if backend_for(q) == "triton":
        from hydrabrain.kernels.paged_attention.triton import paged_decode_attention as impl
    else:
        from hydrabrain.kernels.paged_attention.naive import paged_decode_attention_ref as impl
    return impl(q, k_cache, v_cache, block_tables, seq_lens, scale)


def kv_compact(k_cache, v_cache, src_slots, dst_slots):
    """Move each kept token from src slot to dst slot in place.

    The lists run in token order within each sequence and every survivor moves to an earlier (or
    the same) token position of its own sequence: the slide compaction makes. The Triton kernel
    relies on that order to work in one pass; the reference also takes any permutation.
    """
    if backend_for(k_cache) == "triton":
        from hydrabrain.kernels.kv_compact.triton import kv_compact as impl
    else:
        from hydrabrain.kernels.kv_compact.naive import kv_compact_ref as impl
    return impl(k_cache, v_cache, src_slots, dst_slots)


def triattention_score(*args, **kwargs):
    """Score every cached key of a sequence from calibrated query statistics (see the reference)."""
    probe = args[0] if args else next(iter(kwargs.values()))
    if backend_for(probe) == "triton":
        from hydrabrain.kernels.triattention_score.triton import triattention_score as impl
    else:
        from hydrabrain.kernels.triattention_score.naive import triattention_score_ref as impl
    return impl(*args, **kwargs)
