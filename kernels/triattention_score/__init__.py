"""TriAttention key scoring: the pure-torch reference (naive.py) beside the Triton kernel (triton.py) with the same signature."""

from hydrabrain.kernels.triattention_score.naive import triattention_score_ref

__all__ = ["triattention_score_ref", "triattention_score"]


def __getattr__(name: str):
    # imported on first use: Triton fixes compile-or-interpret when a kernel module is imported
    if name == "triattention_score":
        from hydrabrain.kernels.triattention_score.triton import triattention_score

        return triattention_score
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
