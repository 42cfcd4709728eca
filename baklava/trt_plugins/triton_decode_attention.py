"""Triton kernel: decode attention over the packed, ragged per-head cache (flash-decoding).

Contract: :func:`baklava.trt_plugins.reference.packed_decode_attention` (one decode step of
``BudgetedLayer.attend``). Layout: ``keys/values [B, C, D]`` with KV head ``h`` owning slots
``[o_h, o_h + cap_h)`` of which the first ``fill[b, h]`` are live; no padding to the largest head.

Two launches, pointer-and-stride only (what a TensorRT plugin's ``enqueue`` can call):

1. ``_split_kernel`` grid ``(B, n_tiles)``: a static tile table (:func:`tile_table`, from the
   capacities only, so it can be built once per layer and captured in a CUDA graph) cuts every
   head into tiles of one length; each program reads one tile of one head once for the whole
   GQA group (``g`` query heads), keeping an online softmax (``m``, ``l``, ``acc``) in fp32.
   Tiles past ``fill`` write ``m = -inf``. Heads get programs in proportion to their capacity,
   so ragged capacities keep every SM busy.
2. ``_combine_kernel`` grid ``(B, H_kv)``: merges a head's tiles and the step's own token
   (``key_new``/``value_new``), writes ``out [B, H_q, D]``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    Q, K, V, FILL, OFFSETS, TILE_HEAD, TILE_START, MID_O, MID_M, MID_L,
    stride_qb, stride_qh,
    stride_kb, stride_kt,
    stride_vb, stride_vt,
    stride_fb,
    scale,
    SPLIT_LEN,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    h = tl.load(TILE_HEAD + t)
    start = tl.load(TILE_START + t)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int32)
    base = tl.load(OFFSETS + h).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
        mask=(g < GROUP)[:, None],
        other=0.0,
    )

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    end = tl.minimum(start + SPLIT_LEN, fill)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        live = n < end
        rows = (base + n).to(tl.int64)
        k = tl.load(K + b * stride_kb + rows[:, None] * stride_kt + d[None, :], mask=live[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale  # [G_PAD, BLOCK_N]
        qk = tl.where(live[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + rows[:, None] * stride_vt + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    slot = b * n_tiles + t  # MID_* are contiguous [B, n_tiles, G_PAD(, D)]
    tl.store(MID_M + slot * G_PAD + g, m_i)
    tl.store(MID_L + slot * G_PAD + g, l_i)
    tl.store(MID_O + (slot * G_PAD + g)[:, None] * D + d[None, :], acc)


@triton.jit
def _combine_kernel(
    Q, KN, VN, TILE_FIRST, MID_O, MID_M, MID_L, OUT,
    stride_qb, stride_qh,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_ob, stride_oh,
    scale,
    N_TILES,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    in_group = g < GROUP
    q = tl.load(
        Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    k_new = tl.load(KN + b * stride_knb + h * stride_knh + d).to(tl.float32)
    v_new = tl.load(VN + b * stride_vnb + h * stride_vnh + d).to(tl.float32)
    s_new = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * scale  # the step's own token, [G_PAD]

    first = b * N_TILES + tl.load(TILE_FIRST + h)
    count = tl.load(TILE_FIRST + h + 1) - tl.load(TILE_FIRST + h)
    m = s_new
    for s in range(0, count):
        m = tl.maximum(m, tl.load(MID_M + (first + s) * G_PAD + g))
    w_new = tl.exp(s_new - m)
    num = v_new[None, :] * w_new[:, None]
    den = w_new
    for s in range(0, count):
        w = tl.exp(tl.load(MID_M + (first + s) * G_PAD + g) - m)  # empty slice: exp(-inf) = 0
        den += tl.load(MID_L + (first + s) * G_PAD + g) * w
        num += tl.load(MID_O + ((first + s) * G_PAD + g)[:, None] * D + d[None, :]) * w[:, None]
    out = num / den[:, None]
    tl.store(
        OUT + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + d[None, :], out, mask=in_group[:, None]
    )


def tile_length(capacities, batch: int, block_n: int, sms: int, per_sm: int = 4) -> int:
    """Tile length (a multiple of ``block_n``) giving about ``per_sm`` programs per SM."""
    work = batch * sum(capacities)
    tile = math.ceil(work / (per_sm * sms) / block_n) * block_n
    return max(block_n, min(tile, 8192))


def tile_table(capacities, tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tile_head [T], tile_start [T], tile_first [H + 1])`` int32: head ``h`` owns tiles
    ``tile_first[h] .. tile_first[h + 1] - 1`` starting at slots ``tile_start`` of that head."""
    heads, starts, first = [], [], [0]
    for h, cap in enumerate(capacities):
        n = max(1, math.ceil(cap / tile))
        heads += [h] * n
        starts += [i * tile for i in range(n)]
        first.append(first[-1] + n)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return as_t(heads), as_t(starts), as_t(first)


def packed_decode_attention(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    fill: torch.Tensor,
    offsets: torch.Tensor,
    capacities: list[int],
    scale: float,
    *,
    block_n: int = 64,
    table=None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention on the GPU; arguments as the reference, plus ``offsets [H_kv]`` (int32).

    ``query [B, H_q, D]``, ``key_new/value_new [B, H_kv, D]``, ``keys/values [B, C, D]`` (last dim
    contiguous), ``fill [B, H_kv]``. ``table`` is ``(tile, tile_table(...))``, built once per layer;
    without it one is built here. Returns ``[B, H_q, D]`` in the query's dtype.
    """
    batch, q_heads, head_dim = query.shape
    kv_heads = key_new.shape[1]
    group = q_heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    if table is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        tile = tile_length(capacities, batch, block_n, sms)
        table = (tile, tile_table(capacities, tile, query.device))
    tile, (tile_head, tile_start, tile_first) = table
    n_tiles = tile_head.numel()
    f32 = dict(dtype=torch.float32, device=query.device)
    mid_o = torch.empty(batch, n_tiles, g_pad, head_dim, **f32)
    mid_m = torch.empty(batch, n_tiles, g_pad, **f32)
    mid_l = torch.empty(batch, n_tiles, g_pad, **f32)
    out = torch.empty_like(query)
    fill = fill.contiguous()
    for t in (query, key_new, value_new, keys, values):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    _split_kernel[(batch, n_tiles)](
        query, keys, values, fill, offsets, tile_head, tile_start, mid_o, mid_m, mid_l,
        query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        fill.stride(0),
        scale, tile,
        GROUP=group, G_PAD=g_pad, D=head_dim, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    _combine_kernel[(batch, kv_heads)](
        query, key_new, value_new, tile_first, mid_o, mid_m, mid_l, out,
        query.stride(0), query.stride(1),
        key_new.stride(0), key_new.stride(1),
        value_new.stride(0), value_new.stride(1),
        out.stride(0), out.stride(1),
        scale, n_tiles,
        GROUP=group, G_PAD=g_pad, D=head_dim,
    )  # fmt: skip
    return out
