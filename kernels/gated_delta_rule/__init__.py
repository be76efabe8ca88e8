"""The gated delta rule: pure-torch references (naive.py) beside the Triton kernels with the same signature."""

from hydrabrain.kernels.gated_delta_rule.naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

__all__ = ["chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule_ref"]

__all__ += ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]


def __getattr__(name: str):
    # the Triton kernels load on first use: Triton fixes compile-or-interpret when a kernel module is imported
    if name == "chunk_gated_delta_rule":
        from hydrabrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule

        return chunk_gated_delta_rule
    if name == "fused_recurrent_gated_delta_rule":
        from hydrabrain.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule

        return fused_recurrent_gated_delta_rule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
