"""The gated delta rule: pure-torch references (naive.py) beside the Triton kernels with the same signature."""

from hydrabrain.kernels.gated_delta_rule.naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

__all__ = ["chunk_gated_delta_rule_ref", "recurrent_gated_delta_rule_ref"]
