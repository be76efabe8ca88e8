"""In-place KV compaction: the pure-torch reference (naive.py) beside the Triton kernel (triton.py) with the same signature."""

from hydrabrain.kernels.kv_compact.naive import kv_compact_ref

__all__ = ["kv_compact_ref", "kv_compact"]


def __getattr__(name: str):
    # imported on first use: Triton fixes compile-or-interpret when a kernel module is imported
    if name == "kv_compact":
        from hydrabrain.kernels.kv_compact.triton import kv_compact

        return kv_compact
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
