"""A one-token decoder-layer forward with fewer, larger kernels (the GPU decode step).

transformers' Llama / Qwen2 / Mistral decoder layer launches ~45 kernels per one-token step:
three projections for q, k, v, two for gate and up, and a trail of small elementwise kernels
(RMSNorm's six, RoPE's concatenations, SiLU, residual adds). At batch 8 on an H100 those small
kernels and the gaps between them cost ~2.5 ms of an 11 ms step (BENCHMARKS.md). :func:`fuse`
gives each layer a one-token forward of five launches on the step's critical path, plus the
attention's two (:mod:`baklava.kernels.decode_gemv` holds the matmuls):

    RMSNorm(x) @ [Wq|Wk|Wv] ─▶ RoPE(q, k) + copy v ─▶ attention (split, merge) ─▶ x + o @ Wo
      ─▶ SiLU(h @ Wg) * (h @ Wu), h = RMSNorm(x) ─▶ x + a @ Wd        (+ the cache update beside)

Each norm is folded into the matmul after it: the matmul that wrote ``x`` (the residual add)
leaves per-program partial sums of ``x^2`` behind, and the next matmul normalises ``x`` as it
loads it. A layer hands its partials to the next through the model's :class:`_Chain`; the first
layer (or one whose input came from elsewhere) sums its input's squares in one small launch.

The concatenated weights are the storage of the original ones (the projections' weights become
views into them), so no weight memory is added. Steps of more than one token (prefill chunks),
and one-token steps of more than :data:`GEMV_ROWS` rows (an engine's large buckets), take the
fused chunk forward of :mod:`baklava.runtime.fused_prefill` on the same weights;
steps on devices the kernels do not run on take the original forward. Each
kernel rounds where transformers' eager code rounds (RMSNorm normalises in float32, casts, then
scales by its weight; RoPE rounds each product; a projection rounds before its residual add), so
the step differs from the original only by the matmuls' and the norms' summation order. On
Hopper and later, each of these kernels (and the attention's) is launched while the previous one
drains and waits for it before touching memory (programmatic dependent launch), which removes
the 1-2 us gap between kernels inside the step's CUDA graph.
"""

from __future__ import annotations

import types

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from baklava.kernels import decode_gemv
from baklava.kernels.rope import rope_split
from baklava.runtime import fused_prefill

ARCHITECTURES = ("llama", "qwen2", "mistral")


def _concat_into_views(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding ``linears``' rows; each linear's parameters become views of it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = [m.bias is not None for m in linears]
    bias = (
        torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
    )  # supported(): all or none
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[row : row + rows], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
    return weight, bias


# Rows up to which a one-token step's projections are decode_gemv's Triton kernels; a larger batch
# takes the chunk forward's (cuBLAS matmuls, three elementwise kernels). decode_gemv streams the
# weight once per row block of up to 64, and past one block its tiles do the matmul's arithmetic
# at a fraction of cuBLAS's rate: on an H100 at 466 rows of Llama-3-8B the kernels took 45 of a
# 67 ms step. One layer's four projections (benchmarks/gpu/projection_rows.py, one run): the
# Triton kernels 1.10x faster up to 16 rows, cuBLAS 1.05x at 32, 1.6x at 128, 3.7x at 466
# (BENCHMARKS.md, "The projections past 16 rows").
GEMV_ROWS = 16


def supported(model) -> str | None:
    """``None`` if :func:`fuse` applies to ``model``, else why not (one line)."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r} (fused decode supports {', '.join(ARCHITECTURES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (fused decode supports silu)"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.bias is not None:
            return "o_proj has a bias"
        if any(m.bias is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return "the MLP's projections have biases"
        if len({m.bias is None for m in (attn.q_proj, attn.k_proj, attn.v_proj)}) > 1:
            return "some of q/k/v have a bias and others not"
    return None


class _Chain:
    """What one fused layer leaves for the next: its output's partial sums of squares.

    Taken only by the next layer, and only for the tensor they were computed from; anything else
    (the first layer, a layer after an unfused one) sums its input's squares afresh.
    """

    def __init__(self):
        self.layer, self.ptr, self.ss = None, None, None

    def put(self, layer: int, x: torch.Tensor, ss: torch.Tensor) -> None:
        self.layer, self.ptr, self.ss = layer, x.data_ptr(), ss

    def take(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        ss = self.ss
        fresh = (
            ss is not None
            and self.layer == layer - 1
            and self.ptr == x.data_ptr()
            and ss.shape[1] == x.shape[0]
        )
        self.layer, self.ptr, self.ss = None, None, None
        return ss if fresh else decode_gemv.sum_squares(x)


def fuse(model, device_types: tuple[str, ...] = ("cuda",), *, prefill: bool = True) -> bool:
    """Give every decoder layer the fused one-token forward and, with ``prefill``, the fused chunk
    forward of :mod:`baklava.runtime.fused_prefill` (idempotent: a second call sets both options
    again); False if unsupported.

    ``device_types``: where the fused forwards run (the tests add ``"cpu"`` under Triton's
    interpreter); elsewhere, and for chunks when ``prefill`` is off, the original forward runs.
    """
    if supported(model) is not None:
        return False
    chain = _Chain()
    for layer in model.model.layers:
        if hasattr(layer, "_baklava_fused"):
            layer._baklava_fused.device_types = device_types
            layer._baklava_fused.prefill = prefill
            continue
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight, qkv_bias = _concat_into_views([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, _ = _concat_into_views([mlp.gate_proj, mlp.up_proj])
        layer._baklava_fused = types.SimpleNamespace(
            qkv_weight=qkv_weight,
            qkv_bias=qkv_bias,
            gate_up=gate_up,
            original=layer.forward,
            device_types=device_types,
            prefill=prefill,
            chain=chain,
        )
        layer.forward = types.MethodType(_fused_forward, layer)
    return True


def _fused_forward(self, hidden_states, *args, **kwargs):
    """A decoder layer's forward: one-token steps fused here, chunks of several tokens in
    :mod:`baklava.runtime.fused_prefill` (unless ``prefill`` is off), anything else (positional
    arguments, other devices, an attention implementation transformers keeps apart) the original."""
    fused = self._baklava_fused
    one_token = hidden_states.shape[1] == 1
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.self_attn.config._attn_implementation, None)
    if (
        args
        or hidden_states.device.type not in fused.device_types
        or not (one_token or fused.prefill)
        or interface is None
    ):
        return fused.original(hidden_states, *args, **kwargs)
    if not one_token or hidden_states.shape[0] > GEMV_ROWS:
        return fused_prefill.forward(self, fused, interface, hidden_states, **kwargs)
    return _decode_forward(self, fused, interface, hidden_states, kwargs)


def _decode_forward(self, fused, interface, hidden_states, kwargs):
    cache, attention_mask, position_embeddings = fused_prefill.layer_inputs(kwargs)
    attn, mlp = self.self_attn, self.mlp
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(batch, -1).contiguous()
    head_dim = attn.head_dim
    q_heads = attn.q_proj.weight.shape[0] // head_dim
    kv_heads = attn.k_proj.weight.shape[0] // head_dim
    ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
    ss = fused.chain.take(attn.layer_idx, x)
    qkv = decode_gemv.norm_linear(x, ss, ln1.weight, ln1.variance_epsilon, fused.qkv_weight, fused.qkv_bias)
    cos, sin = position_embeddings
    q, k, v = rope_split(qkv, cos, sin, q_heads, kv_heads, head_dim)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    x, ss = decode_gemv.linear_residual(out.reshape(batch, -1), attn.o_proj.weight, x)
    act = decode_gemv.norm_linear_silu(x, ss, ln2.weight, ln2.variance_epsilon, fused.gate_up)
    x, ss = decode_gemv.linear_residual(act, mlp.down_proj.weight, x)
    fused.chain.put(attn.layer_idx, x, ss)
    return x.view(batch, 1, -1)
