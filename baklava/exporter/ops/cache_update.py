"""``baklava::BudgetedCacheUpdate``: commit a step's tokens into each head's slots, evicting.

Node attributes (static, from the profile)::

    capacities   ints[H_kv]  tokens each KV head owns in the packed cache
    sink         int         first tokens every head keeps
    window       int         most recent tokens every head keeps
    policy       string      "h2o" (keep the highest accumulated attention) or "ring" (recency)
    pool_kernel  int         max-pool width over the new tokens' scores (SnapKV)
    kv_dtype     string      how the cache stores tokens (new keys and values rounded as it would
                             return them before they are stored: kv_round_trip.py)

Outputs have the shapes of the past inputs (no data-dependent shapes). Per head, the candidates
are the ``c_h`` stored slots followed by the ``S`` new tokens; the ``c_h`` with the highest
priority (sink > recent window > score, see :mod:`baklava.runtime.selection`) are kept, valid
ones first, in arrival order. ONNX Runtime runs the per-layer function overload built here.
"""

from __future__ import annotations

from onnx import FunctionProto, NodeProto

from baklava import kv_format
from baklava.eviction import POLICIES
from baklava.exporter.ops.body import DOUBLE, FLOAT, INT64, Body, make_op_node
from baklava.exporter.ops.kv_round_trip import round_trip
from baklava.exporter.ops.spec import BUDGETED_CACHE_UPDATE
from baklava.runtime.selection import TIER


def cache_update_attrs(
    capacities, sink: int, window: int, policy: str, pool_kernel: int, kv_dtype: str = "auto"
) -> dict:
    """Node attributes, named exactly as the TensorRT plugin fields."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    return {
        "capacities": [int(c) for c in capacities],  # tokens per KV head in the packed cache
        "sink": int(sink),  # first tokens always kept
        "window": int(window),  # most recent tokens always kept
        "policy": policy,  # "h2o" | "ring"
        "pool_kernel": int(pool_kernel),  # SnapKV max-pool over new-token scores
        "kv_dtype": kv_format.parse(kv_dtype).name,  # the cache's storage format
    }


def make_node(inputs: list[str], outputs: list[str], name: str, overload: str, **attrs) -> NodeProto:
    return make_op_node(BUDGETED_CACHE_UPDATE, inputs, outputs, name, overload, cache_update_attrs(**attrs))


def make_function(
    capacities,
    sink: int,
    window: int,
    policy: str,
    pool_kernel: int,
    overload: str,
    kv_dtype: str = "auto",
    head_dim: int | None = None,
) -> FunctionProto:
    """The standard-op implementation for one attribute set (one layer)."""
    caps = [int(c) for c in capacities]
    b = Body(f"{overload}/")
    dim = b.op("Gather", b.op("Shape", "past_key"), b.ints(2))  # [1]: D as a tensor
    batch = b.op("Gather", b.op("Shape", "past_key"), b.ints(0))
    new_kv = {t: round_trip(b, t, kv_dtype, head_dim) for t in ("key", "value")}

    valid_new = "token_mask"  # [B, S]
    rank = b.op("Sub", b.op("CumSum", b.op("Cast", valid_new, to=INT64), b.const(1)), b.const(1))
    new_pos = b.op("Add", b.op("Unsqueeze", "seen", b.ints(1)), rank)  # [B, S]
    seen_after = b.op(
        "Add", "seen", b.op("ReduceSum", b.op("Cast", valid_new, to=INT64), b.ints(1), keepdims=0)
    )
    recent_from = b.op("Unsqueeze", b.op("Sub", seen_after, b.const(window)), b.ints(1))  # [B, 1]

    keys, values, positions, scores, fills = [], [], [], [], []
    offset = 0
    for h, cap in enumerate(caps):
        fill = b.slice("past_fill", h, h + 1, axis=1)  # [B, 1]
        live = b.op("Less", b.const(list(range(cap))), fill)  # [B, c]
        cand_valid = b.op("Concat", live, valid_new, axis=1)  # [B, c+S]
        cand_pos = b.op("Concat", b.slice("past_position", offset, offset + cap, axis=1), new_pos, axis=1)

        new_score = b.op("Squeeze", b.slice("token_mass", h, h + 1, axis=1), b.ints(1))  # [B, S]
        # ring ignores attention: scores stay 0, as in the reference
        keep_mass = b.op("And", valid_new, b.const(policy != "ring", dtype=bool))
        new_score = b.op("Where", keep_mass, new_score, b.const(0.0, dtype="float32"))
        if pool_kernel > 1:  # SnapKV: a token scores the max of its neighbourhood
            pooled = b.op(
                "MaxPool",
                b.op("Unsqueeze", new_score, b.ints(1)),
                kernel_shape=[pool_kernel],
                pads=[pool_kernel // 2, pool_kernel // 2],
                strides=[1],
            )
            new_score = b.op("Squeeze", pooled, b.ints(1))
        stored_score = b.slice("past_score", offset, offset + cap, axis=1)
        if policy != "ring":  # H2O: stored tokens accumulate the attention they receive
            stored_score = b.op("Add", stored_score, b.slice("slot_mass", offset, offset + cap, axis=1))
        cand_score = b.op("Concat", stored_score, new_score, axis=1)  # [B, c+S]

        pos = b.op("Cast", cand_pos, to=DOUBLE)
        body = pos if policy == "ring" else b.op("Cast", cand_score, to=DOUBLE)
        tier = lambda k: b.const(k * TIER, dtype="float64")  # noqa: E731
        pri = b.op(
            "Where",
            b.op("GreaterOrEqual", cand_pos, recent_from),
            b.op("Add", tier(2), pos),
            body,  # offset 0: scores keep their float64 precision (see runtime.selection)
        )
        pri = b.op("Where", b.op("Less", cand_pos, b.const(sink)), b.op("Sub", tier(3), pos), pri)
        pri = b.op("Where", cand_valid, pri, b.const(float("-inf"), dtype="float64"))

        _, idx = b.op("TopK", pri, b.ints(cap), axis=1, largest=1, sorted=1, outputs=2)  # [B, c]
        kept_valid = b.op("Cast", b.op("GatherElements", cand_valid, idx, axis=1), to=INT64)
        width = b.op("Add", b.const(cap), b.op("Gather", b.op("Shape", valid_new), b.ints(1)))
        order = b.op("Add", idx, b.op("Mul", b.op("Sub", b.const(1), kept_valid), width))
        _, perm = b.op("TopK", b.op("Neg", order), b.ints(cap), axis=1, largest=1, sorted=1, outputs=2)
        idx = b.op("GatherElements", idx, perm, axis=1)  # kept, valid first, in arrival order

        idx3 = b.op(
            "Expand", b.op("Unsqueeze", idx, b.ints(2)), b.op("Concat", batch, b.ints(cap), dim, axis=0)
        )
        for past, new, out in (("past_key", "key", keys), ("past_value", "value", values)):
            cand = b.op(
                "Concat",
                b.slice(past, offset, offset + cap, axis=1),
                b.op("Squeeze", b.slice(new_kv[new], h, h + 1, axis=1), b.ints(1)),
                axis=1,
            )
            out.append(b.op("GatherElements", cand, idx3, axis=1))  # [B, c, D]
        positions.append(b.op("GatherElements", cand_pos, idx, axis=1))
        scores.append(b.op("GatherElements", cand_score, idx, axis=1))
        count = b.op("ReduceSum", b.op("Cast", cand_valid, to=INT64), b.ints(1), keepdims=1)
        fills.append(b.op("Min", count, b.const([cap])))  # [B, 1]
        offset += cap

    b.rename(b.op("Concat", *keys, axis=1), "present_key")
    b.rename(b.op("Concat", *values, axis=1), "present_value")
    b.rename(b.op("Concat", *positions, axis=1), "present_position")
    b.rename(b.op("Cast", b.op("Concat", *scores, axis=1), to=FLOAT), "present_score")
    b.rename(b.op("Concat", *fills, axis=1), "present_fill")
    return b.function(BUDGETED_CACHE_UPDATE, overload, __doc__)
