"""``baklava::BudgetedAttention``: attention over the packed per-head cache plus the new tokens.

Node attributes (static, from the profile)::

    capacities   ints[H_kv]  tokens each KV head owns in the packed cache (C = sum)
    num_q_heads  int         H_q (a multiple of H_kv: GQA groups of H_q / H_kv)
    scale        float       softmax scale, usually head_dim ** -0.5
    obs_window   int         last queries whose attention scores the tokens (SnapKV / H2O)
    kv_dtype     string      how the cache stores tokens: "auto", "fp8", "int8", "int4" (the new
                             keys and values are rounded as it would return them: kv_round_trip.py)

The ONNX Runtime implementation is a model-local function, one overload per layer, unrolled
over KV heads (capacities are static, so every slice is static)::

    for head h (offset o_h, capacity c_h, query group G_h):
        K = concat(past_key[:, o_h:o_h+c_h], key[:, h])        [B, c_h + S, D]
        mask = concat(slot < past_fill[:, h],  causal & token_mask)
        P = softmax(query[:, G_h] K^T * scale, masked)        [B, g, S, c_h + S]
        output[:, G_h] = P V
        mass = mean_g sum_{last obs_window valid queries} P     -> slot_mass / token_mass
"""

from __future__ import annotations

from onnx import FunctionProto, NodeProto

from baklava import kv_format
from baklava.exporter.ops.body import BOOL, FLOAT, FLOAT_MIN, INT64, Body, make_op_node
from baklava.exporter.ops.kv_round_trip import round_trip
from baklava.exporter.ops.spec import BUDGETED_ATTENTION


def attention_attrs(
    capacities, num_q_heads: int, scale: float, obs_window: int, kv_dtype: str = "auto"
) -> dict:
    """Node attributes, named exactly as the TensorRT plugin fields."""
    return {
        "capacities": [int(c) for c in capacities],  # tokens per KV head in the packed cache
        "num_q_heads": int(num_q_heads),  # H_q; H_kv = len(capacities)
        "scale": float(scale),  # softmax scale
        "obs_window": int(obs_window),  # queries that score tokens for eviction
        "kv_dtype": kv_format.parse(kv_dtype).name,  # the cache's storage format
    }


def make_node(inputs: list[str], outputs: list[str], name: str, overload: str, **attrs) -> NodeProto:
    return make_op_node(BUDGETED_ATTENTION, inputs, outputs, name, overload, attention_attrs(**attrs))


def make_function(
    capacities,
    num_q_heads: int,
    scale: float,
    obs_window: int,
    overload: str,
    kv_dtype: str = "auto",
    head_dim: int | None = None,
) -> FunctionProto:
    """The standard-op implementation for one attribute set (one layer)."""
    caps = [int(c) for c in capacities]
    heads = len(caps)
    if num_q_heads % heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of {heads} KV heads")
    group = num_q_heads // heads
    b = Body(f"{overload}/")
    neg = b.op("CastLike", b.const(FLOAT_MIN, dtype="float32"), "query")
    scale_t = b.op("CastLike", b.const(scale, dtype="float32"), "query")
    key, value = (round_trip(b, t, kv_dtype, head_dim) for t in ("key", "value"))

    # causal & key-valid mask among the new tokens, [B, 1, S, S]
    seq = b.op("Gather", b.op("Shape", "token_mask"), b.ints(1))
    ones = b.op("Expand", b.const(True, dtype=bool), b.op("Concat", seq, seq, axis=0))
    causal = b.op("Cast", b.op("Trilu", b.op("Cast", ones, to=INT64), upper=0), to=BOOL)
    key_ok = b.op("Unsqueeze", "token_mask", b.ints(1, 2))  # [B, 1, 1, S]
    new_mask = b.op("And", b.op("Unsqueeze", causal, b.ints(0, 1)), key_ok)  # [B, 1, S, S]
    rows = b.op("Concat", b.ints(1, 1), seq, b.ints(1), axis=0)  # broadcast target [1, 1, S, 1]
    q_ok = b.op("Cast", b.op("Unsqueeze", "token_mask", b.ints(1, 3)), to=FLOAT)  # [B, 1, S, 1]
    q_obs = b.op("Slice", q_ok, b.ints(-obs_window), b.ints(2**62), b.ints(2))

    outputs, slot_mass, token_mass = [], [], []
    offset = 0
    for h, cap in enumerate(caps):
        k_old = b.slice("past_key", offset, offset + cap, axis=1)  # [B, c, D]
        v_old = b.slice("past_value", offset, offset + cap, axis=1)
        k_new = b.op("Squeeze", b.slice(key, h, h + 1, axis=1), b.ints(1))  # [B, S, D]
        v_new = b.op("Squeeze", b.slice(value, h, h + 1, axis=1), b.ints(1))
        keys = b.op("Unsqueeze", b.op("Concat", k_old, k_new, axis=1), b.ints(1))  # [B, 1, c+S, D]
        values = b.op("Unsqueeze", b.op("Concat", v_old, v_new, axis=1), b.ints(1))
        fill = b.slice("past_fill", h, h + 1, axis=1)  # [B, 1]
        live = b.op("Less", b.const(list(range(cap))), fill)  # [B, c]
        live = b.op("Expand", b.op("Unsqueeze", live, b.ints(1, 2)), rows)  # [B, 1, S, c]
        mask = b.op("Concat", live, new_mask, axis=3)  # [B, 1, S, c+S]

        q = b.slice("query", h * group, (h + 1) * group, axis=1)  # [B, g, S, D]
        logits = b.op("Mul", b.op("MatMul", q, b.op("Transpose", keys, perm=[0, 1, 3, 2])), scale_t)
        probs = b.op("Softmax", b.op("Where", mask, logits, neg), axis=-1)  # [B, g, S, c+S]
        outputs.append(b.op("MatMul", probs, values))  # [B, g, S, D]

        obs = b.op("Slice", b.op("Cast", probs, to=FLOAT), b.ints(-obs_window), b.ints(2**62), b.ints(2))
        mass = b.op(
            "ReduceMean",
            b.op("ReduceSum", b.op("Mul", obs, q_obs), b.ints(2), keepdims=0),
            b.ints(1),
            keepdims=0,
        )
        slot_mass.append(b.slice(mass, 0, cap, axis=1))  # [B, c]
        token_mass.append(b.op("Unsqueeze", b.slice(mass, cap, 2**62, axis=1), b.ints(1)))  # [B, 1, S]
        offset += cap

    b.rename(b.op("Concat", *outputs, axis=1), "output")
    b.rename(b.op("Concat", *slot_mass, axis=1), "slot_mass")
    b.rename(b.op("Concat", *token_mass, axis=1), "token_mass")
    return b.function(BUDGETED_ATTENTION, overload, __doc__)
