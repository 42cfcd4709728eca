"""Triton kernels: the elementwise parts of a prefill chunk's decoder layer, one launch each.

transformers' eager Llama / Qwen2 layer spends a chunk's non-matmul time in a trail of small
kernels: RMSNorm is six (a float32 copy, ``pow``, ``mean``, ``add``, ``rsqrt``, two ``mul``, a
cast back), RoPE eight (two ``rotate_half`` concatenations, four ``mul``, two ``add``), SiLU-gate
two. Each reads and writes the whole ``[S, hidden]`` or ``[S, intermediate]`` activation, and each
costs the host a launch. These three kernels do the same arithmetic in one pass each:

    rms_norm(x, w)            [N, H]          -> w * round(x * rsqrt(mean(x^2) + eps))
    rope_heads(qkv, cos, sin) [B * S, (Hq + 2 Hkv) D] -> q [B, Hq, S, D], k, v [B, Hkv, S, D]
    silu_gate(gate_up)        [N, 2 I]        -> round(silu(gate)) * up

rounding where eager PyTorch rounds (RMSNorm normalises in float32, casts, then scales by its
weight; each RoPE product rounds; SiLU rounds before the gate product), so a fused chunk differs
from transformers' only by summation order (:mod:`baklava.runtime.fused_prefill`). q, k and v
come out head-major and contiguous, the layout the packed cache stores and flash attention reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# a chunk's token count changes from prompt to prompt: not specialised on (one compiled variant)
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(X, W, Y, n_rows, eps, H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    ok = (rows < n_rows)[:, None] & (cols < H)[None, :]
    at = rows[:, None].to(tl.int64) * H + cols[None, :]
    x = tl.load(X + at, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 1) / H + eps)
    normed = (xf * inv[:, None]).to(x.dtype)
    w = tl.load(W + cols, mask=cols < H, other=0.0)
    tl.store(Y + at, (w[None, :].to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * round(x * rsqrt(mean(x^2) + eps))`` over the last dimension of contiguous
    ``x [..., H]`` (transformers' ``LlamaRMSNorm`` / ``Qwen2RMSNorm``); same shape and dtype."""
    hidden = x.shape[-1]
    flat = x.reshape(-1, hidden)
    assert flat.is_contiguous(), "rms_norm takes a contiguous input"
    out = torch.empty_like(flat)
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, min(16, 4096 // block_h))  # ~4k elements a program
    grid = (triton.cdiv(flat.shape[0], rows),)
    _rms_norm_kernel[grid](flat, weight, out, flat.shape[0], eps, H=hidden, BLOCK_H=block_h, ROWS=rows)
    return out.view(x.shape)


@triton.jit(do_not_specialize=["S"])
def _rope_heads_kernel(
    QKV, COS, SIN, Q, K, V,
    S, q_heads, kv_heads, width, cs_b, cs_s,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program per (``BLOCK_S`` tokens, head, row): rotate q and k (rotate_half), copy v."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    head = tl.program_id(1)
    b = tl.program_id(2)
    d = tl.arange(0, D)
    ok = (s < S)[:, None]
    src = QKV + (b * S + s)[:, None].to(tl.int64) * width + head * D
    x = tl.load(src + d[None, :], mask=ok, other=0.0)
    if head < q_heads + kv_heads:
        half: tl.constexpr = D // 2
        partner = tl.load(src + ((d + half) % D)[None, :], mask=ok, other=0.0)
        rotated = tl.where((d < half)[None, :], -partner, partner)  # cat(-x2, x1)
        angle = b * cs_b + s[:, None].to(tl.int64) * cs_s + d[None, :]
        cos = tl.load(COS + angle, mask=ok, other=0.0)
        sin = tl.load(SIN + angle, mask=ok, other=0.0)
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)  # each product rounds, as eager does
        c = (rotated.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        out = (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)
        if head < q_heads:
            dst = Q + ((b * q_heads + head) * S + s)[:, None].to(tl.int64) * D + d[None, :]
        else:
            dst = K + ((b * kv_heads + head - q_heads) * S + s)[:, None].to(tl.int64) * D + d[None, :]
        tl.store(dst, out, mask=ok)
    else:
        dst = V + ((b * kv_heads + head - q_heads - kv_heads) * S + s)[:, None].to(tl.int64) * D + d[None, :]
        tl.store(dst, x, mask=ok)


def rope_heads(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int
):
    """``q [B, H_q, S, D]``, ``k, v [B, H_kv, S, D]`` (contiguous) from a chunk's fused projection
    ``qkv [B, S, (H_q + 2 H_kv) D]``; q and k rotated by ``cos, sin [B or 1, S, D]`` (transformers'
    position embeddings, ``rotate_half`` convention); one launch."""
    batch, s, width = qkv.shape
    assert qkv.is_contiguous() and width == (q_heads + 2 * kv_heads) * head_dim
    q = qkv.new_empty(batch, q_heads, s, head_dim)
    k = qkv.new_empty(batch, kv_heads, s, head_dim)
    v = torch.empty_like(k)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    cs_b = 0 if cos.shape[0] == 1 else cos.stride(0)  # one row of angles shared by the batch
    block_s = max(1, min(64, 4096 // head_dim))
    grid = (triton.cdiv(s, block_s), q_heads + 2 * kv_heads, batch)
    _rope_heads_kernel[grid](
        qkv, cos, sin, q, k, v, s, q_heads, kv_heads, width, cs_b, cos.stride(1), D=head_dim, BLOCK_S=block_s
    )
    return q, k, v


@triton.jit(do_not_specialize=["n_rows"])
def _silu_gate_kernel(GU, Y, n_rows, inner, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < n_rows)[:, None] & (cols < inner)[None, :]
    at = rows[:, None].to(tl.int64) * (2 * inner) + cols[None, :]
    g = tl.load(GU + at, mask=ok, other=0.0)
    u = tl.load(GU + at + inner, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf * tl.sigmoid(gf)).to(g.dtype)
    y = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    tl.store(Y + rows[:, None].to(tl.int64) * inner + cols[None, :], y, mask=ok)


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """``round(silu(gate)) * up`` of ``gate_up [..., 2 I]`` (gate columns first, then up: the
    concatenated ``[W_gate; W_up]`` projection); returns ``[..., I]``."""
    inner = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * inner)
    assert flat.is_contiguous(), "silu_gate takes a contiguous input"
    out = flat.new_empty(flat.shape[0], inner)
    rows, block = 4, 1024
    grid = (triton.cdiv(flat.shape[0], rows), triton.cdiv(inner, block))
    _silu_gate_kernel[grid](flat, out, flat.shape[0], inner, ROWS=rows, BLOCK=block)
    return out.view(*gate_up.shape[:-1], inner)
