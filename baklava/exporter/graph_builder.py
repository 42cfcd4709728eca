"""Build the decoder as an ONNX graph with the packed per-head cache as inputs and outputs.

One graph serves a prefill chunk and a decode step (dynamic batch ``B`` and new tokens ``S``)::

    input_ids [B,S] ─Gather─▶ x ─┬─ RMSNorm ─ q,k,v proj ─ RoPE ─┐
    position_ids [B,S] ─cos/sin ─┘                               ▼
    past.{l}.{key,value,position,score,fill} ─────▶ BudgetedAttention ─ o_proj ─(+x)─ RMSNorm ─ MLP ─(+)─▶ ...
    token_mask [B,S], seen [B]                  └─▶ BudgetedCacheUpdate ─▶ present.{l}.*
                                                              ... ─ RMSNorm ─ lm_head ─▶ logits [B,S,V]

A quantized ``kv_dtype`` adds ``past.{l}.key_mean`` and ``past.{l}.key_scale [B, H_kv, D]`` (and
their ``present``): the keys reach both ops as ``(k - mean) * scale`` and the query as
``q / scale``, both fixed by a row's first tokens (``seen == 0``), as the PyTorch runtime stores
them (``BudgetedLayer.smooth_keys``, :mod:`baklava.runtime.kv_slots`). Attention is blind to both;
the rounding error shrinks. The ops themselves are unchanged.

Weights are initializers (saved as external data). Architectures come from a registry: the
Llama, Qwen2 and Mistral families share module names and differ only in q/k/v biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from baklava import kv_format as kv_formats
from baklava.errors import ModelError
from baklava.exporter.ops import layer_ops
from baklava.exporter.ops.spec import DOMAIN, ONNX_OPSET, OPSET_VERSION
from baklava.profiles.profile_file import BudgetProfile
from baklava.runtime.kv_slots import BALANCE_FLOOR, BALANCE_RANGE

CACHE_FIELDS = ("key", "value", "position", "score", "fill")
# a quantized graph's per-row state of each head (smoothed keys, runtime/kv_slots.py): its mean key
# and its keys' channel balance against the queries
SMOOTH_FIELDS = ("key_mean", "key_scale")


@dataclass(frozen=True)
class ArchSpec:
    """What differs between supported architectures (module names are shared)."""

    qkv_bias: bool


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(qkv_bias=False),
    "mistral": ArchSpec(qkv_bias=False),
    "qwen2": ArchSpec(qkv_bias=True),
}


def cache_names(layer: int, prefix: str, smooth: bool = False) -> dict[str, str]:
    fields = CACHE_FIELDS + (SMOOTH_FIELDS if smooth else ())
    return {field: f"{prefix}.{layer}.{field}" for field in fields}


def _smoothed(
    g, q: str, k: str, past: dict, present: dict, heads: tuple[int, int, int], name: str
) -> tuple[str, str]:
    """``(q / s, (k - mu) * s)`` for ``q [B, H_q, S, D]``, ``k [B, H_kv, S, D]``: a row whose first
    tokens these are (``seen == 0``) takes the mean key ``mu`` from them, and the channel balance
    ``s`` unless it is one token (then ``s = 1``), both over the tokens ``token_mask`` keeps, as
    ``kv_slots._smoothed`` does. ``heads``: ``(H_q, H_kv, D)``."""
    n_q, n_kv, d = heads
    f32 = lambda tag, value: g.const(f"{name}/{tag}", value, dtype=np.float32)  # noqa: E731
    axes = lambda tag, values: g.const(f"{name}/{tag}", values)  # noqa: E731
    first = g.op(
        "Unsqueeze",
        g.op("Equal", "seen", g.const(f"{name}/zero", 0), name=f"{name}/First"),
        axes("row_axes", [1, 2]),
        name=f"{name}/FirstRows",
    )  # [B, 1, 1]
    weight = g.op(
        "Unsqueeze",
        g.op("Cast", "token_mask", name=f"{name}/Weight", to=TensorProto.FLOAT),
        axes("weight_axes", [1, 3]),
        name=f"{name}/Weights",
    )  # [B, 1, S, 1]
    count = g.op(
        "Max",
        g.op("ReduceSum", weight, axes("count_axis", [2]), name=f"{name}/Count", keepdims=0),
        f32("at_least_one", 1.0),
        name=f"{name}/CountFloor",
    )  # [B, 1, 1]

    def real_mean(x: str, tag: str) -> str:  # x [B, H, S, D] over the real tokens -> [B, H, D]
        weighted = g.op("Mul", x, weight, name=f"{name}/{tag}/Weighted")
        total = g.op("ReduceSum", weighted, axes(f"{tag}_seq", [2]), name=f"{name}/{tag}/Sum", keepdims=0)
        return g.op("Div", total, count, name=f"{name}/{tag}/Mean")

    mean = real_mean(k, "mean")
    g.nodes.append(
        helper.make_node("Where", [first, mean, past[SMOOTH_FIELDS[0]]], [present[SMOOTH_FIELDS[0]]],
                         name=f"{name}/KeyMean")
    )  # fmt: skip
    seq_axis = axes("seq_axis", [2])
    centre = g.op("Unsqueeze", present[SMOOTH_FIELDS[0]], seq_axis, name=f"{name}/Centre")
    centred = g.op("Sub", k, centre, name=f"{name}/Sub")

    def square(x: str, tag: str) -> str:
        return g.op("Mul", x, x, name=f"{name}/{tag}/Square")

    grouped = g.op("Reshape", q, axes("grouped", [0, n_kv, n_q // n_kv, -1, d]), name=f"{name}/Grouped")
    group_sq = g.op(
        "ReduceMean", square(grouped, "reach"), axes("group", [2]), name=f"{name}/reach/Group", keepdims=0
    )  # [B, H_kv, S, D]
    tiny = f32("tiny", BALANCE_FLOOR)
    reach = g.op("Sqrt", real_mean(group_sq, "reach"), name=f"{name}/reach/Sqrt")  # [B, H_kv, D]
    spread = g.op("Sqrt", real_mean(square(centred, "spread"), "spread"), name=f"{name}/spread/Sqrt")
    reach = g.op("Max", reach, tiny, name=f"{name}/ReachFloor")
    spread = g.op("Max", spread, tiny, name=f"{name}/SpreadFloor")
    ratio = g.op("Sqrt", g.op("Div", reach, spread, name=f"{name}/Ratio"), name=f"{name}/Balance")
    norm_sq = g.op(
        "ReduceMean", square(ratio, "norm"), axes("channels", [2]), name=f"{name}/norm/Mean", keepdims=1
    )
    norm = g.op("Sqrt", norm_sq, name=f"{name}/norm/Sqrt")
    balance = g.op(
        "Clip",
        g.op("Div", ratio, norm, name=f"{name}/Normalise"),
        f32("lo", 1 / BALANCE_RANGE),
        f32("hi", BALANCE_RANGE),
        name=f"{name}/Clip",
    )
    steps = g.op(
        "Gather", g.op("Shape", k, name=f"{name}/Shape"), g.const(f"{name}/s_dim", 2), name=f"{name}/S"
    )
    several = g.op("Greater", steps, g.const(f"{name}/one", 1), name=f"{name}/Several")
    fresh = g.op("Where", several, balance, f32("unit", 1.0), name=f"{name}/Fresh")
    g.nodes.append(
        helper.make_node("Where", [first, fresh, past[SMOOTH_FIELDS[1]]], [present[SMOOTH_FIELDS[1]]],
                         name=f"{name}/KeyScale")
    )  # fmt: skip
    scale = g.op("Unsqueeze", present[SMOOTH_FIELDS[1]], seq_axis, name=f"{name}/Scale")  # [B, H_kv, 1, D]
    k = g.op("Mul", centred, scale, name=f"{name}/ScaleKeys")
    group_scale = g.op("Unsqueeze", scale, axes("group_axis", [2]), name=f"{name}/GroupScale")
    q = g.op("Div", grouped, group_scale, name=f"{name}/ScaleQuery")
    return g.op("Reshape", q, axes("ungrouped", [0, n_q, -1, d]), name=f"{name}/Ungrouped"), k


class _Graph:
    """Nodes, initializers and hierarchical names (``/model/layers.3/attn/q_proj/MatMul``)."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def op(self, op_type: str, *inputs: str, name: str, outputs: int = 1, **attrs):
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name=name))
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.init(name, np.asarray(values, dtype=dtype))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _rms_norm(g: _Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    #   x * rsqrt(mean(x^2) + eps) * w
    var = g.op(
        "ReduceMean", g.op("Mul", x, x, name=f"{name}/Sq"), g.const(f"{name}/axes", [-1]), name=f"{name}/Mean"
    )
    inv = g.op(
        "Reciprocal",
        g.op(
            "Sqrt",
            g.op("Add", var, g.const(f"{name}/eps", eps, np.float32), name=f"{name}/AddEps"),
            name=f"{name}/Sqrt",
        ),
        name=f"{name}/Inv",
    )
    return g.op(
        "Mul",
        g.op("Mul", x, inv, name=f"{name}/Scale"),
        g.init(f"{name}.weight", _np(weight)),
        name=f"{name}/MulW",
    )


def _linear(g: _Graph, x: str, module: torch.nn.Linear, name: str) -> str:
    y = g.op("MatMul", x, g.init(f"{name}.weight_t", _np(module.weight).T), name=f"{name}/MatMul")
    if module.bias is not None:
        y = g.op("Add", y, g.init(f"{name}.bias", _np(module.bias)), name=f"{name}/Add")
    return y


def _heads(g: _Graph, x: str, n: int, d: int, name: str) -> str:
    # [B, S, n*d] -> [B, n, S, d]
    r = g.op("Reshape", x, g.const(f"{name}/shape", [0, 0, n, d]), name=f"{name}/Reshape")
    return g.op("Transpose", r, name=f"{name}/Transpose", perm=[0, 2, 1, 3])


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int, name: str) -> str:
    #   x * cos + rotate_half(x) * sin,  rotate_half([a, b]) = [-b, a]
    a, b = g.op("Split", x, g.const(f"{name}/split", [half, half]), name=f"{name}/Split", outputs=2, axis=-1)
    rotated = g.op("Concat", g.op("Neg", b, name=f"{name}/Neg"), a, name=f"{name}/Concat", axis=-1)
    return g.op(
        "Add",
        g.op("Mul", x, cos, name=f"{name}/MulCos"),
        g.op("Mul", rotated, sin, name=f"{name}/MulSin"),
        name=f"{name}/Add",
    )


def build_decoder(model, profile: BudgetProfile, *, progress: bool = True) -> onnx.ModelProto:
    """The ONNX decoder of ``model`` with the profile's capacities baked into its cache ops.

    Raises :class:`ModelError` for an unsupported architecture or RoPE variant.
    """
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise ModelError(
            f"cannot export architecture {cfg.model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    rope = getattr(cfg, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": getattr(cfg, "rope_theta", 10000.0),
    }
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"cannot export RoPE type {rope['rope_type']!r} yet (only the default RoPE)")
    profile.require_capacities()
    info = profile.model
    n_q, n_kv, d = info.num_q_heads, info.num_kv_heads, info.head_dim
    eps = float(cfg.rms_norm_eps)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    smooth = kv_formats.parse(profile.kv_format).quantized  # the keys as the PyTorch runtime stores them
    g = _Graph()

    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("token_mask", TensorProto.BOOL, ["batch", "seq"]),
        helper.make_tensor_value_info("seen", i64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]

    # RoPE tables from positions: [B, 1, S, D]
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    pos = g.op(
        "Unsqueeze",
        g.op("Cast", "position_ids", name="/model/rope/Cast", to=f32),
        g.const("/model/rope/axes", [-1]),
        name="/model/rope/Unsqueeze",
    )
    freqs = g.op(
        "Mul", pos, g.init("/model/rope/inv_freq", inv_freq.astype(np.float32)), name="/model/rope/Freqs"
    )
    emb = g.op(
        "Unsqueeze",
        g.op("Concat", freqs, freqs, name="/model/rope/Concat", axis=-1),
        g.const("/model/rope/axes1", [1]),
        name="/model/rope/Heads",
    )
    cos, sin = g.op("Cos", emb, name="/model/rope/Cos"), g.op("Sin", emb, name="/model/rope/Sin")

    inner = model.model
    x = g.op(
        "Gather",
        g.init("model.embed_tokens.weight", _np(inner.embed_tokens.weight)),
        "input_ids",
        name="/model/embed_tokens/Gather",
    )
    functions = []
    layers = list(enumerate(inner.layers))
    for li, layer in tqdm(layers, desc="building graph", unit="layer", disable=not progress):
        p = f"/model/layers.{li}"
        attn = layer.self_attn
        h = _rms_norm(g, x, layer.input_layernorm.weight, eps, f"{p}/input_layernorm")

        def project(proj, heads, tag, rope=True, h=h, p=p):
            y = _heads(g, _linear(g, h, proj, f"{p}/attn/{tag}_proj"), heads, d, f"{p}/attn/{tag}")
            return _rope(g, y, cos, sin, d // 2, f"{p}/attn/{tag}_rope") if rope else y

        q, k = project(attn.q_proj, n_q, "q"), project(attn.k_proj, n_kv, "k")
        v = project(attn.v_proj, n_kv, "v", rope=False)

        past, present = cache_names(li, "past", smooth), cache_names(li, "present", smooth)
        total = int(profile.capacities[li].sum())
        for names in (past, present):
            target = inputs if names is past else outputs
            target += [
                helper.make_tensor_value_info(names["key"], f32, ["batch", total, d]),
                helper.make_tensor_value_info(names["value"], f32, ["batch", total, d]),
                helper.make_tensor_value_info(names["position"], i64, ["batch", total]),
                helper.make_tensor_value_info(names["score"], f32, ["batch", total]),
                helper.make_tensor_value_info(names["fill"], i64, ["batch", n_kv]),
            ]
            if smooth:
                target += [
                    helper.make_tensor_value_info(names[field], f32, ["batch", n_kv, d])
                    for field in SMOOTH_FIELDS
                ]
        if smooth:
            q, k = _smoothed(g, q, k, past, present, (n_q, n_kv, d), f"{p}/attn/k_smooth")
        wiring = {
            "query": q, "key": k, "value": v, "token_mask": "token_mask", "seen": "seen",
            "past_key": past["key"], "past_value": past["value"], "past_position": past["position"],
            "past_score": past["score"], "past_fill": past["fill"],
            "output": f"{p}/attn/BudgetedAttention/output", "slot_mass": f"{p}/attn/slot_mass",
            "token_mass": f"{p}/attn/token_mass",
            "present_key": present["key"], "present_value": present["value"],
            "present_position": present["position"], "present_score": present["score"],
            "present_fill": present["fill"],
        }  # fmt: skip
        nodes, fns = layer_ops(
            li, profile.capacities[li].tolist(), n_q, d**-0.5, profile.eviction, wiring, profile.kv_format, d
        )
        g.nodes += nodes
        functions += fns

        o = g.op("Transpose", wiring["output"], name=f"{p}/attn/o/Transpose", perm=[0, 2, 1, 3])
        o = g.op("Reshape", o, g.const(f"{p}/attn/o/shape", [0, 0, n_q * d]), name=f"{p}/attn/o/Reshape")
        x = g.op("Add", x, _linear(g, o, attn.o_proj, f"{p}/attn/o_proj"), name=f"{p}/attn/Residual")

        h = _rms_norm(g, x, layer.post_attention_layernorm.weight, eps, f"{p}/post_attention_layernorm")
        mlp = layer.mlp
        gate = _linear(g, h, mlp.gate_proj, f"{p}/mlp/gate_proj")
        act = g.op("Mul", gate, g.op("Sigmoid", gate, name=f"{p}/mlp/Sigmoid"), name=f"{p}/mlp/SiLU")
        up = g.op("Mul", act, _linear(g, h, mlp.up_proj, f"{p}/mlp/up_proj"), name=f"{p}/mlp/Mul")
        x = g.op("Add", x, _linear(g, up, mlp.down_proj, f"{p}/mlp/down_proj"), name=f"{p}/mlp/Residual")

    x = _rms_norm(g, x, inner.norm.weight, eps, "/model/norm")
    head = model.lm_head.weight
    if head.data_ptr() == inner.embed_tokens.weight.data_ptr():  # tied: reuse the embedding, [V, H]
        flat = g.op("Reshape", x, g.const("/lm_head/flat", [-1, cfg.hidden_size]), name="/lm_head/Flatten")
        logits = g.op("Gemm", flat, "model.embed_tokens.weight", name="/lm_head/Gemm", transB=1)
        shape = g.op(
            "Concat",
            g.op(
                "Slice",
                g.op("Shape", "input_ids", name="/lm_head/Shape"),
                g.const("/lm_head/s0", [0]),
                g.const("/lm_head/s1", [2]),
                name="/lm_head/BS",
            ),
            g.const("/lm_head/v", [cfg.vocab_size]),
            name="/lm_head/OutShape",
            axis=0,
        )
        logits = g.op("Reshape", logits, shape, name="/lm_head/Reshape")
    else:
        logits = g.op("MatMul", x, g.init("lm_head.weight_t", _np(head).T), name="/lm_head/MatMul")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))

    graph = helper.make_graph(g.nodes, "baklava_decoder", inputs, outputs, initializer=g.inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=functions,
        ir_version=10,
        producer_name="baklava",
        doc_string=f"BaKlaVa decoder for {info.name}, budget {(profile.allocation or {}).get('budget')}",
    )


def save_model(model: onnx.ModelProto, path, data_name: str = "model.onnx.data") -> None:
    """Save with weights as external data (one file beside the graph)."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
