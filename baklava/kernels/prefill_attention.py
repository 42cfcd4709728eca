"""Triton kernels: a prefill chunk's attention over the packed cache, and its SnapKV masses.

Contract: :func:`baklava.runtime.prefill_attention.unpadded_chunk` (its SDPA path is the
reference): chunk queries ``q [B, H_q, S, D]`` attend, per KV head ``h``, over the head's live
stored slots (``keys/values [B, C, D]``, slots ``[o_h, o_h + fill[b, h])``, all visible) and the
chunk's own keys (``k_new/v_new [B, H_kv, S, D]``, causal). No padding, no bias tensor, stored
keys read in place (no ``torch.cat``), no GQA copies.

Two launches:

1. ``_attention_kernel`` grid ``(ceil(S / BLOCK_M), H_q, B)``: one query tile of one query head;
   online softmax over the stored tiles, then over the chunk's keys up to the tile's last query;
   writes ``out [B, S, H_q, D]`` (the layout the model's o projection reads) and each query's
   log-sum-exp ``lse [B, H_q, S]``.
2. ``_mass_kernel`` grid ``(ceil((n + S) / BLOCK_N), H_kv, B)``: the attention the last ``obs``
   queries of the chunk pay each candidate (the head's stored slots, then the ``S`` new tokens), summed
   over those queries and averaged over the head's query group, from the scores and the saved
   log-sum-exp (no second softmax over the whole chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online_update(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One key tile folded into the running (max, sum, output) of a query tile (base-2 exponent)."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# per call: a chunk's length; a pool row's fill pointer is 16-byte aligned or not by row parity
@triton.jit(do_not_specialize=["S"], do_not_specialize_on_alignment=["FILL"])
def _attention_kernel(
    Q, K, V, KN, VN, FILL, OFFSETS, OUT, LSE,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kt, stride_vb, stride_vt,
    stride_knb, stride_knh, stride_kns, stride_vnb, stride_vnh, stride_vns,
    stride_fb, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    S, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    qh = tl.program_id(1)
    b = tl.program_id(2)
    h = qh // GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * stride_qb + qh * stride_qh + rows[:, None] * stride_qs + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    base = tl.load(OFFSETS + h).to(tl.int64)
    n = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    for j0 in range(0, n, BLOCK_N):  # stored slots: all visible
        cols = j0 + tl.arange(0, BLOCK_N)
        ok = cols < n
        slot = base + cols
        k = tl.load(K + b * stride_kb + slot[:, None] * stride_kt + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + slot[:, None] * stride_vt + d[None, :], mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _online_update(q, k, v, ok[None, :], m_i, l_i, acc, qk_scale)

    last = tl.minimum((tile + 1) * BLOCK_M, S)
    for j0 in range(0, last, BLOCK_N):  # the chunk's keys: causal
        cols = j0 + tl.arange(0, BLOCK_N)
        ok = cols < S
        k = tl.load(
            KN + b * stride_knb + h * stride_knh + cols[:, None] * stride_kns + d[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        v = tl.load(
            VN + b * stride_vnb + h * stride_vnh + cols[:, None] * stride_vns + d[None, :],
            mask=ok[:, None],
            other=0.0,
        )
        visible = ok[None, :] & (cols[None, :] <= rows[:, None])
        m_i, l_i, acc = _online_update(q, k, v, visible, m_i, l_i, acc, qk_scale)

    out = acc / l_i[:, None]
    tl.store(
        OUT + b * stride_ob + rows[:, None] * stride_os + qh * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log-sum-exp of the scaled scores
    tl.store(LSE + b * stride_lb + qh * stride_lh + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["S", "OBS"], do_not_specialize_on_alignment=["FILL"])
def _mass_kernel(
    Q, K, KN, FILL, OFFSETS, LSE, MASS,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kt, stride_knb, stride_knh, stride_kns,
    stride_fb, stride_lb, stride_lh, stride_mb, stride_mh,
    S, OBS, scale,
    GROUP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    base = tl.load(OFFSETS + h).to(tl.int64)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # candidates: [0, fill) stored, [fill, fill + S) new
    stored = cols < fill
    i = cols - fill
    new = (i >= 0) & (i < S)
    d = tl.arange(0, D)
    k = tl.where(
        stored[:, None],
        tl.load(
            K + b * stride_kb + (base + cols)[:, None] * stride_kt + d[None, :],
            mask=stored[:, None],
            other=0.0,
        ),
        tl.load(
            KN + b * stride_knb + h * stride_knh + i[:, None] * stride_kns + d[None, :],
            mask=new[:, None],
            other=0.0,
        ),
    )
    r = tl.arange(0, W)  # (query head of the group, window query) pairs
    r_ok = r < GROUP * OBS
    qh = h * GROUP + r // OBS
    qrow = S - OBS + r % OBS
    q = tl.load(
        Q + b * stride_qb + qh[:, None] * stride_qh + qrow[:, None] * stride_qs + d[None, :],
        mask=r_ok[:, None],
        other=0.0,
    )
    lse = tl.load(LSE + b * stride_lb + qh * stride_lh + qrow, mask=r_ok, other=0.0)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    visible = r_ok[:, None] & (stored[None, :] | (new[None, :] & (i[None, :] <= qrow[:, None])))
    p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    mass = tl.sum(p, 0) / GROUP
    tl.store(MASS + b * stride_mb + h * stride_mh + cols, mass, mask=cols < fill + S)


def prefill_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    fill: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, S, H_q, D], lse [B, H_q, S] fp32)`` of an unpadded chunk (module docstring).

    ``offsets [H_kv]`` int32 on the device; ``fill [B, H_kv]``.
    """
    batch, q_heads, s, dim = query.shape
    kv_heads = key_new.shape[1]
    for t in (query, keys, values, key_new, value_new):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    out = query.new_empty(batch, s, q_heads, dim)
    lse = torch.empty(batch, q_heads, s, dtype=torch.float32, device=query.device)
    grid = (triton.cdiv(s, block_m), q_heads, batch)
    _attention_kernel[grid](
        query, keys, values, key_new, value_new, fill, offsets, out, lse,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        key_new.stride(0), key_new.stride(1), key_new.stride(2),
        value_new.stride(0), value_new.stride(1), value_new.stride(2),
        fill.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        s, scale * LOG2E,
        GROUP=q_heads // kv_heads, D=dim, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out, lse


def observation_masses(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_new: torch.Tensor,
    fill: torch.Tensor,
    offsets: torch.Tensor,
    lse: torch.Tensor,
    stored: int,
    obs: int,
    scale: float,
    *,
    block_n: int = 64,
) -> torch.Tensor:
    """``mass [B, H_kv, stored + S]`` fp32: for head ``h`` of row ``b``, column ``j < fill[b, h]``
    is its slot ``j`` and column ``fill[b, h] + i`` new token ``i`` (``stored`` >= every fill)."""
    batch, q_heads, s, dim = query.shape
    kv_heads = key_new.shape[1]
    group = q_heads // kv_heads
    mass = torch.zeros(batch, kv_heads, stored + s, dtype=torch.float32, device=query.device)
    width = max(16, triton.next_power_of_2(group * obs))
    grid = (triton.cdiv(stored + s, block_n), kv_heads, batch)
    _mass_kernel[grid](
        query, keys, key_new, fill, offsets, lse, mass,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), key_new.stride(0), key_new.stride(1), key_new.stride(2),
        fill.stride(0), lse.stride(0), lse.stride(1), mass.stride(0), mass.stride(1),
        s, obs, scale,
        GROUP=group, D=dim, W=width, BLOCK_N=block_n,
    )  # fmt: skip
    return mass
