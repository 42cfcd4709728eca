"""A one-token decoder-layer forward with fewer, larger kernels (the GPU decode step).

transformers' Llama / Qwen2 / Mistral decoder layer launches ~45 kernels per one-token step:
three projections for q, k, v, two for gate and up, and a trail of small elementwise kernels
(RMSNorm's six, RoPE's concatenations, SiLU, residual adds). At batch 8 on an H100 those small
kernels and the gaps between them cost ~2.5 ms of an 11 ms step (BENCHMARKS.md). :func:`fuse`
gives each layer a one-token forward of about a dozen launches:

    RMSNorm ─▶ x @ [Wq|Wk|Wv] ─▶ RoPE(q, k) + copy v ─▶ cache update + attention ─▶ o @ Wo
      ─▶ residual add + RMSNorm ─▶ h @ [Wg|Wu] ─▶ SiLU(g) * u ─▶ x + a @ Wd

The concatenated weights are the storage of the original ones (the projections' weights become
views into them), so no weight memory is added. Steps of more than one token (prefill chunks),
and one-token steps on devices the kernels do not run on, take the original forward. Each
kernel rounds where transformers' eager code rounds (RMSNorm normalises in float32, casts, then
scales by its weight; RoPE rounds each product), so the step differs from the original only by
the matmuls' accumulation order and the MLP's residual add, done inside the down projection's
matmul (in place). (Measured on an H100, batch 8: the attention's residual add inside the o
projection's matmul instead of the norm kernel was no faster, and a Triton GEMV did not beat
cuBLAS on these shapes; BENCHMARKS.md.)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ARCHITECTURES = ("llama", "qwen2", "mistral")


@triton.jit
def _scaled_norm(x, W, Y, offs, ok, n, eps):
    """transformers' RMSNorm of one row ``x`` (float32), rounded to ``Y``'s dtype: normalise in
    float32, cast, then scale by the weight."""
    var = tl.sum(x * x, axis=0) / n
    normed = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)  # transformers casts before scaling
    w = tl.load(W + offs, mask=ok, other=0.0)
    return (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty)


@triton.jit
def _rms_norm_kernel(X, W, Y, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + row * n + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * n + offs, _scaled_norm(x, W, Y, offs, ok, n, eps), mask=ok)


@triton.jit
def _add_rms_norm_kernel(X, ADD, W, XO, Y, n, eps, BLOCK: tl.constexpr):
    """``XO = X + ADD`` (rounded, as eager's residual add) and ``Y = RMSNorm(XO)``, one row each."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + row * n + offs, mask=ok, other=0.0)
    o = tl.load(ADD + row * n + offs, mask=ok, other=0.0)
    s = (x.to(tl.float32) + o.to(tl.float32)).to(x.dtype)
    tl.store(XO + row * n + offs, s, mask=ok)
    tl.store(Y + row * n + offs, _scaled_norm(s.to(tl.float32), W, Y, offs, ok, n, eps), mask=ok)


@triton.jit
def _rope_kernel(QKV, COS, SIN, cs_stride, Q, K, V, q_heads, kv_heads, width, D: tl.constexpr):
    """One program per (row, head) of q, k and v: rotate q and k (rotate_half convention), copy v."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs = tl.arange(0, D)
    src = QKV + b * width + head * D
    x = tl.load(src + offs)
    if head < q_heads + kv_heads:
        half: tl.constexpr = D // 2
        partner = tl.load(src + (offs + half) % D)
        rotated = tl.where(offs < half, -partner, partner)  # cat(-x2, x1)
        cos = tl.load(COS + b * cs_stride + offs)
        sin = tl.load(SIN + b * cs_stride + offs)
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)  # each product rounds, as eager does
        c = (rotated.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        out = (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)
        if head < q_heads:
            tl.store(Q + (b * q_heads + head) * D + offs, out)
        else:
            tl.store(K + (b * kv_heads + head - q_heads) * D + offs, out)
    else:
        tl.store(V + (b * kv_heads + head - q_heads - kv_heads) * D + offs, x)


@triton.jit
def _silu_mul_kernel(GU, Y, inner, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inner
    g = tl.load(GU + b * 2 * inner + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + b * 2 * inner + inner + offs, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)  # SiLU rounds, then the product rounds
    tl.store(Y + b * inner + offs, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of ``x [B, n]`` (contiguous) in one launch."""
    rows, n = x.shape
    y = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, weight, y, n, eps, BLOCK=triton.next_power_of_2(n))
    return y


def add_rms_norm(x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x + o, RMSNorm(x + o))`` of ``[B, n]`` rows in one launch (the residual add, then the norm)."""
    rows, n = x.shape
    xo, y = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, o, weight, xo, y, n, eps, BLOCK=triton.next_power_of_2(n))
    return xo, y


def rope_split(qkv: torch.Tensor, cos, sin, q_heads: int, kv_heads: int, head_dim: int):
    """``q [B, H_q, 1, D]``, ``k, v [B, H_kv, 1, D]`` from one token's ``qkv [B, (H_q + 2 H_kv) D]``,
    q and k rotated by ``cos, sin [B or 1, 1, D]`` (last dim contiguous); one launch."""
    batch = qkv.shape[0]
    q = qkv.new_empty(batch, q_heads, 1, head_dim)
    k = qkv.new_empty(batch, kv_heads, 1, head_dim)
    v = torch.empty_like(k)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    stride = 0 if cos.shape[0] == 1 else cos.stride(0)  # one row of angles shared by the batch
    grid = (batch, q_heads + 2 * kv_heads)
    _rope_kernel[grid](qkv, cos, sin, stride, q, k, v, q_heads, kv_heads, qkv.shape[1], D=head_dim)
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``SiLU(g) * u`` of ``gate_up [B, 2 I]`` (gate first); one launch."""
    batch, width = gate_up.shape
    inner = width // 2
    y = gate_up.new_empty(batch, inner)
    block = 1024
    _silu_mul_kernel[(batch, triton.cdiv(inner, block))](gate_up, y, inner, BLOCK=block)
    return y


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


def fuse(model, device_types: tuple[str, ...] = ("cuda",)) -> bool:
    """Give every decoder layer the fused one-token forward (idempotent); False if unsupported.

    ``device_types``: where the fused forward runs (the tests add ``"cpu"`` under Triton's
    interpreter); elsewhere, and for steps of more than one token, the original forward runs.
    """
    if supported(model) is not None:
        return False
    for layer in model.model.layers:
        if hasattr(layer, "_baklava_fused"):
            layer._baklava_fused.device_types = device_types
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
        )
        layer.forward = types.MethodType(_decode_forward, layer)
    return True


def _decode_forward(self, hidden_states, *args, **kwargs):
    fused = self._baklava_fused
    if args or hidden_states.shape[1] != 1 or hidden_states.device.type not in fused.device_types:
        return fused.original(hidden_states, *args, **kwargs)
    # transformers < 5.24 hands the cache over as `past_key_values`, later versions as `cache`
    cache = kwargs.pop("past_key_values", None)
    named = kwargs.pop("cache", None)
    if cache is None:
        cache = named
    kwargs.pop("use_cache", None)
    attention_mask = kwargs.pop("attention_mask", None)
    position_embeddings = kwargs.pop("position_embeddings")
    attn, mlp = self.self_attn, self.mlp
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(batch, -1)
    head_dim = attn.head_dim
    q_heads = attn.q_proj.weight.shape[0] // head_dim
    kv_heads = attn.k_proj.weight.shape[0] // head_dim
    h = rms_norm(x, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
    qkv = F.linear(h, fused.qkv_weight, fused.qkv_bias)
    cos, sin = position_embeddings
    q, k, v = rope_split(qkv, cos, sin, q_heads, kv_heads, head_dim)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, None)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    norm = self.post_attention_layernorm
    o = F.linear(out.reshape(batch, -1), attn.o_proj.weight)
    x, h = add_rms_norm(x, o, norm.weight, norm.variance_epsilon)
    act = silu_mul(F.linear(h, fused.gate_up))
    x.addmm_(act, mlp.down_proj.weight.t())  # the MLP's residual add in the matmul (in place: no copy of x)
    return x.view(batch, 1, -1)
