"""Names, versions, attributes, inputs and outputs of the ``baklava`` custom ops.

One definition shared by the ONNX nodes, their ONNX-function implementations (what ONNX Runtime
runs) and, later, the TensorRT plugins (whose field names must equal these attribute names).
The full semantics are in ``docs/ops.md``; the PyTorch reference is
:class:`baklava.runtime.packed_cache.BudgetedLayer`.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "baklava"
OPSET_VERSION = 1
ONNX_OPSET = 21  # standard ops used inside the function bodies


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[str, ...]


BUDGETED_ATTENTION = OpSpec(
    name="BudgetedAttention",
    inputs=("query", "key", "value", "past_key", "past_value", "past_fill", "token_mask"),
    outputs=("output", "slot_mass", "token_mass"),
    attributes=("capacities", "num_q_heads", "scale", "obs_window", "kv_dtype"),
)

BUDGETED_CACHE_UPDATE = OpSpec(
    name="BudgetedCacheUpdate",
    inputs=(
        "past_key",
        "past_value",
        "past_position",
        "past_score",
        "past_fill",
        "seen",
        "key",
        "value",
        "token_mask",
        "slot_mass",
        "token_mass",
    ),
    outputs=("present_key", "present_value", "present_position", "present_score", "present_fill"),
    attributes=("capacities", "sink", "window", "policy", "pool_kernel", "kv_dtype"),
)

OPS = (BUDGETED_ATTENTION, BUDGETED_CACHE_UPDATE)
