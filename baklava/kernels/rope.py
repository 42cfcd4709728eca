"""Triton kernel: RoPE on one token's fused q/k/v projection, split into q, k and v (one launch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baklava.kernels.launch import dependent_launch


@triton.jit
def _rope_kernel(
    QKV, COS, SIN, cs_stride, Q, K, V, q_heads, kv_heads, width, D: tl.constexpr, PDL: tl.constexpr
):
    """One program per (row, head) of q, k and v: rotate q and k (rotate_half convention), copy v."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs = tl.arange(0, D)
    if PDL:
        tl.extra.cuda.gdc_wait()
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
    pdl = dependent_launch(qkv.device)
    _rope_kernel[grid](
        qkv, cos, sin, stride, q, k, v, q_heads, kv_heads, qkv.shape[1], D=head_dim, PDL=pdl, launch_pdl=pdl
    )
    return q, k, v
