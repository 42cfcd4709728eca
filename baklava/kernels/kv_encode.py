"""Triton: a step's new keys and values quantized as they enter the cache, in one launch.

The GPU twin of the quantizing half of :func:`baklava.runtime.kv_slots.encode`, bit for bit.
There, PyTorch rounds a step's tokens in some forty elementwise kernels a layer (smooth the keys,
quantize keys and values, dequantize them for attention, scale the query; int4 adds a rotation
each way), each a launch on a decode step's critical path; here one program per (block of
tokens, KV head, row) does it all in registers::

    keys [B, H_kv, S, D] ─(k - key_mean) * key_scale, rounded to the model's dtype─┐
    values [B, H_kv, S, D] ─────────────────────────────────────────────────────────┤
          int8 / fp8: kv_rounding.quantize_rows (absmax / qmax as float16; round, or e4m3)
          int4: rotate, kv_rounding.quantize_groups (two-level group scales), nibbles packed
          ├─▶ payload [B, H_kv, S, P] and scales [B, H_kv, S, W], as kv_format.quantize stores them
          └─▶ what the slots give back, [B, H_kv, S, D] in the model's dtype (what attention reads)
    query [B, H_q, S, D] ─ / key_scale (the head's group) ─▶ the query attention pairs with them

The smoothing state (``key_mean``, ``key_scale``: a row's first tokens fix it) is updated before,
by :mod:`baklava.runtime.kv_slots`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baklava.kernels.kv_rounding import INT4, group_values, hadamard_rows, quantize_groups, quantize_rows

BLOCK_S = 16  # tokens a program rounds (fewer for a shorter step: a decode step's one token alone)


@triton.jit
def _store(x, scale, PAYLOAD, SCALES, BACK, out, scale_at, ok, KV_QUANT: tl.constexpr):
    """Payload ``x`` (its values as float32), its float16 ``scale`` a row, and what the slot gives
    back (``x * scale`` in the model's dtype)."""
    if KV_QUANT == 1:  # float8 bits (exact: x is an e4m3 value)
        tl.store(PAYLOAD + out, x.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=ok[:, None])
    else:
        tl.store(PAYLOAD + out, x.to(tl.int8), mask=ok[:, None])
    tl.store(SCALES + scale_at, scale.to(tl.float16), mask=ok)
    tl.store(BACK + out, (x * scale[:, None]).to(BACK.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _store_int4(
    x, PAYLOAD, SCALES, BACK, row, ok, KV_GROUP: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr
):
    """int4 (:mod:`baklava.kv_format`): ``x [BLOCK, D]`` rotated, quantized with two-level group
    scales; channel ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one, each
    ``q + 8``; scales as int16 words, the float16 top's bits then the codes two a word; and what
    the slot gives back (rotated back) in the model's dtype. ``row``: the rows' indices."""
    G: tl.constexpr = D // KV_GROUP
    W: tl.constexpr = 1 + (G + 1) // 2 if G > 1 else 1
    q, scale, top, code = quantize_groups(hadamard_rows(x, BLOCK, D), KV_GROUP, BLOCK, D)
    low, high = tl.split(tl.reshape((q + 8.0).to(tl.int32), [BLOCK, D // 2, 2]))
    j = tl.arange(0, D // 2)
    tl.store(
        PAYLOAD + row[:, None] * (D // 2) + j[None, :], (low | (high << 4)).to(tl.uint8), mask=ok[:, None]
    )
    tl.store(SCALES + row * W, top.to(tl.float16).to(tl.int16, bitcast=True), mask=ok)
    if G > 1:  # G is a power of two: whole words of two codes
        first, second = tl.split(tl.reshape(code.to(tl.int32), [BLOCK, G // 2, 2]))
        w = tl.arange(0, G // 2)
        tl.store(
            SCALES + row[:, None] * W + 1 + w[None, :], (first | (second << 8)).to(tl.int16), mask=ok[:, None]
        )
    d = tl.arange(0, D)
    back = hadamard_rows(group_values(q, scale, KV_GROUP, BLOCK, D), BLOCK, D)
    tl.store(BACK + row[:, None] * D + d[None, :], back.to(BACK.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _encode_kernel(
    Q, K, V, MEAN, BAL, Q_OUT, KP, KS, VP, VS, K_BACK, V_BACK,
    S,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr,
    SMOOTH: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(1)
    s = blk * BLOCK + tl.arange(0, BLOCK)
    live = s < S
    ok = live[:, None]
    d = tl.arange(0, D)
    out = ((b * heads + h) * S + s)[:, None] * D + d[None, :]  # outputs: contiguous [B, H_kv, S, D]
    scale_at = (b * heads + h) * S + s
    k = tl.load(K + b * stride_kb + h * stride_kh + s[:, None] * stride_ks + d[None, :], mask=ok, other=0.0)
    if SMOOTH:  # (k - mean) * balance, rounded to the model's dtype as the reference stores it
        state = (b * heads + h) * D + d
        mean = tl.load(MEAN + state)
        balance = tl.load(BAL + state)
        k = ((k.to(tl.float32) - mean[None, :]) * balance[None, :]).to(k.dtype)
        for g in tl.static_range(GROUP):  # the head's query group pairs with the scaled keys
            at = b * stride_qb + (h * GROUP + g) * stride_qh + s[:, None] * stride_qs + d[None, :]
            q = tl.load(Q + at, mask=ok, other=0.0)
            q_at = ((b * heads + h) * GROUP + g) * S * D + s[:, None] * D + d[None, :]
            tl.store(Q_OUT + q_at, tl.div_rn(q.to(tl.float32), balance[None, :]).to(q.dtype), mask=ok)
    v = tl.load(V + b * stride_vb + h * stride_vh + s[:, None] * stride_vs + d[None, :], mask=ok, other=0.0)
    if KV_QUANT == 2:
        _store_int4(k.to(tl.float32), KP, KS, K_BACK, scale_at, live, KV_GROUP, BLOCK, D)
        _store_int4(v.to(tl.float32), VP, VS, V_BACK, scale_at, live, KV_GROUP, BLOCK, D)
    else:
        qk, sk = quantize_rows(k.to(tl.float32), KV_QUANT)
        qv, sv = quantize_rows(v.to(tl.float32), KV_QUANT)
        _store(qk, sk, KP, KS, K_BACK, out, scale_at, live, KV_QUANT)
        _store(qv, sv, VP, VS, V_BACK, out, scale_at, live, KV_QUANT)


def takes(kv_format, head_dim: int) -> bool:
    """Formats and head dims the kernel encodes: every quantized format, power-of-two head dims
    of at least 16 (int4: its group of 32)."""
    if not kv_format.quantized or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return kv_format.group is None or head_dim % kv_format.group == 0


def encode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_format,
    key_mean: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """``query [B, H_q, S, D]``, ``keys / values [B, H_kv, S, D]`` (last dims contiguous) ->
    ``(query, slots, keys, values)`` as :func:`baklava.runtime.kv_slots.encode` returns them
    for a layer storing ``kv_format``: the query scaled where ``key_mean`` and ``key_scale [B,
    H_kv, D]`` (float32) smooth the keys, ``slots`` the payload and scales to store (``[B, H_kv,
    S, width]``), and the keys and values the slots give back."""
    from baklava.kernels.kv_rounding import rounding

    batch, heads, seq, dim = keys.shape
    assert takes(kv_format, dim), f"kv_encode takes no {kv_format.name} vectors of {dim} channels"
    for t in (query, keys, values):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    smooth = key_mean is not None
    payload = dict(dtype=kv_format.storage_dtype, device=keys.device)
    words = dict(dtype=kv_format.scale_dtype, device=keys.device)
    width, scales = dim * kv_format.bits // 8, kv_format.scales_per_vector(dim)
    slots = {
        "keys": torch.empty(batch, heads, seq, width, **payload),
        "values": torch.empty(batch, heads, seq, width, **payload),
        "key_scales": torch.empty(batch, heads, seq, scales, **words),
        "value_scales": torch.empty(batch, heads, seq, scales, **words),
    }
    k_back, v_back = (
        torch.empty_like(keys, memory_format=torch.contiguous_format),
        torch.empty_like(values, memory_format=torch.contiguous_format),
    )
    q_out = torch.empty_like(query, memory_format=torch.contiguous_format) if smooth else query
    block = min(BLOCK_S, triton.next_power_of_2(seq))
    grid = (triton.cdiv(seq, block), heads, batch)
    consts = rounding(kv_format, dim)
    _encode_kernel[grid](
        query, keys, values, key_mean if smooth else keys, key_scale if smooth else keys, q_out,
        slots["keys"], slots["key_scales"], slots["values"], slots["value_scales"], k_back, v_back,
        seq,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        GROUP=query.shape[1] // heads, D=dim, BLOCK=block, **consts, SMOOTH=smooth,
        num_warps=4 if block == BLOCK_S else 1,
        enable_fp_fusion=consts["KV_QUANT"] != INT4,  # the rotation adds products rounded one by one
    )  # fmt: skip
    return q_out, slots, k_back, v_back
