"""Run every Triton kernel here through Triton's interpreter, so the CPU can check them.

Triton decides between compiling and interpreting when a kernel is decorated, so the variable is
set before any kernel module is imported; a kernel module some earlier test already imported
without it is imported again.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_KERNEL_MODULES = (
    "hydrabrain.kernels.gated_delta_rule.fused_recurrent",
    "hydrabrain.kernels.gated_delta_rule.chunk",
    "hydrabrain.kernels.paged_attention.triton",
    "hydrabrain.kernels.kv_compact.triton",
    "hydrabrain.kernels.triattention_score.triton",
)

for _name in _KERNEL_MODULES:
    _module = sys.modules.get(_name)
    if _module is not None and not getattr(_module, "INTERPRETED", True):
        importlib.reload(_module)
