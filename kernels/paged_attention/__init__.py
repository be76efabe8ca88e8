"""Paged decode attention: the pure-torch reference (naive.py) beside the Triton kernel (triton.py) with the same signature."""

from hydrabrain.kernels.paged_attention.naive import paged_decode_attention_ref

__all__ = ["paged_decode_attention_ref", "paged_decode_attention"]


def __getattr__(name: str):
    # imported on first use: Triton fixes compile-or-interpret when a kernel module is imported
    if name == "paged_decode_attention":
        from hydrabrain.kernels.paged_attention.triton import paged_decode_attention

        return paged_decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
