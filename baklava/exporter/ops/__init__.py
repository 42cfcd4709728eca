"""The ``baklava`` ONNX custom ops: spec, node builders, ONNX-function implementations.

``single_layer_model`` wires one layer's two ops into a runnable model: the unit that the graph
exporter repeats per decoder layer, and what the op tests run against the PyTorch reference.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from baklava.eviction import EvictionConfig
from baklava.exporter.ops import budgeted_attention, cache_update
from baklava.exporter.ops.spec import (
    BUDGETED_ATTENTION,
    BUDGETED_CACHE_UPDATE,
    DOMAIN,
    ONNX_OPSET,
    OPSET_VERSION,
)

__all__ = ["BUDGETED_ATTENTION", "BUDGETED_CACHE_UPDATE", "DOMAIN", "layer_ops", "single_layer_model"]


def layer_ops(
    layer: int,
    capacities,
    num_q_heads: int,
    scale: float,
    eviction: EvictionConfig,
    names: dict,
    kv_dtype: str = "auto",
    head_dim: int | None = None,
):
    """Nodes and function overloads of one layer.

    ``names`` maps every op input/output name (see ``spec``) to the graph's tensor names;
    ``head_dim`` is baked into the bodies of a rotating ``kv_dtype`` (int4).
    Returns ``(nodes, functions)``.
    """
    overload = f"layer{layer}"
    attn_attrs = dict(
        capacities=capacities,
        num_q_heads=num_q_heads,
        scale=scale,
        obs_window=eviction.obs_window,
        kv_dtype=kv_dtype,
    )
    upd_attrs = dict(
        capacities=capacities,
        sink=eviction.sink,
        window=eviction.window,
        policy=eviction.policy,
        pool_kernel=eviction.pool_kernel,
        kv_dtype=kv_dtype,
    )
    nodes = [
        budgeted_attention.make_node(
            [names[n] for n in BUDGETED_ATTENTION.inputs],
            [names[n] for n in BUDGETED_ATTENTION.outputs],
            name=f"/model/layers.{layer}/attn/BudgetedAttention",
            overload=overload,
            **attn_attrs,
        ),
        cache_update.make_node(
            [names[n] for n in BUDGETED_CACHE_UPDATE.inputs],
            [names[n] for n in BUDGETED_CACHE_UPDATE.outputs],
            name=f"/model/layers.{layer}/attn/BudgetedCacheUpdate",
            overload=overload,
            **upd_attrs,
        ),
    ]
    functions = [
        budgeted_attention.make_function(**attn_attrs, overload=overload, head_dim=head_dim),
        cache_update.make_function(**upd_attrs, overload=overload, head_dim=head_dim),
    ]
    return nodes, functions


def single_layer_model(
    capacities,
    num_q_heads: int,
    head_dim: int,
    eviction: EvictionConfig,
    scale: float | None = None,
    kv_dtype: str = "auto",
):
    """A model running one layer's attention + cache update on explicit tensors (fp32)."""
    heads, total = len(capacities), int(sum(capacities))
    scale = head_dim**-0.5 if scale is None else scale
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("query", f, ["B", num_q_heads, "S", head_dim]),
        helper.make_tensor_value_info("key", f, ["B", heads, "S", head_dim]),
        helper.make_tensor_value_info("value", f, ["B", heads, "S", head_dim]),
        helper.make_tensor_value_info("past_key", f, ["B", total, head_dim]),
        helper.make_tensor_value_info("past_value", f, ["B", total, head_dim]),
        helper.make_tensor_value_info("past_position", i64, ["B", total]),
        helper.make_tensor_value_info("past_score", f, ["B", total]),
        helper.make_tensor_value_info("past_fill", i64, ["B", heads]),
        helper.make_tensor_value_info("seen", i64, ["B"]),
        helper.make_tensor_value_info("token_mask", TensorProto.BOOL, ["B", "S"]),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f, ["B", num_q_heads, "S", head_dim]),
        helper.make_tensor_value_info("present_key", f, ["B", total, head_dim]),
        helper.make_tensor_value_info("present_value", f, ["B", total, head_dim]),
        helper.make_tensor_value_info("present_position", i64, ["B", total]),
        helper.make_tensor_value_info("present_score", f, ["B", total]),
        helper.make_tensor_value_info("present_fill", i64, ["B", heads]),
    ]
    names = {
        n: n for n in BUDGETED_ATTENTION.inputs + BUDGETED_CACHE_UPDATE.inputs + BUDGETED_CACHE_UPDATE.outputs
    }
    names["output"] = "output"
    nodes, functions = layer_ops(0, capacities, num_q_heads, scale, eviction, names, kv_dtype, head_dim)
    graph = helper.make_graph(nodes, "baklava_layer", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=functions,
        ir_version=10,
        producer_name="baklava",
    )
    onnx.checker.check_model(model, full_check=True)
    return model
