"""Triton kernels: a prefill chunk's attention over the packed cache, and its SnapKV masses.

Contract: :func:`baklava.runtime.prefill_attention.unpadded_chunk` (its SDPA path is the
reference; with padding, ``BudgetedLayer.attend`` 's per-head biased path): chunk queries
``q [B, H_q, S, D]`` attend, per KV head ``h``, over the head's live stored slots
(``keys/values [B, C, D]``, slots ``[o_h, o_h + fill[b, h])``, all visible) and the chunk's own
keys (``k_new/v_new [B, H_kv, S, D]``, causal; with ``valid [B, S]``, padded tokens are no key to
anyone, as the model's causal + padding mask says). No bias tensor, stored keys read in place
(no ``torch.cat``), no GQA copies.

Quantized slots (``kv_format`` fp8 / int8 / int4, :mod:`baklava.kv_format`) are read as payload
plus scales and dequantized in registers, as the decode kernel reads them (``_load_slots``: the
key scale multiplies the logits, the value scale the probabilities, int4 nibbles are scaled per
group); int4's slots hold rotated vectors, so the chunk's queries, keys and values are rotated
first and the output rotated back (the rotation keeps dot products).

Two launches:

1. ``_attention_kernel`` grid ``(ceil(S / BLOCK_Q), H_kv, B)``: ``BLOCK_Q`` queries of every
   query head of one KV head's group as one tile, so each key / value tile is loaded once for the
   group (against once per query head: 0.84 against 1.00 ms a layer of 2048 queries over a
   budget-0.3 32k cache, Llama-3-8B shapes on an H200); online softmax over the stored tiles,
   then over the chunk's keys up to the tile's last query, masks only on a head's last stored
   tile and the diagonal; writes ``out [B, S, H_q, D]`` (the layout the model's o projection
   reads) and each query's log-sum-exp ``lse [B, H_q, S]``.
2. ``_mass_kernel`` grid ``(ceil((max cap + S) / BLOCK_N), H_kv, B)``: the attention the last
   ``obs`` queries of the chunk pay each candidate (the head's stored slots, then the ``S`` new
   tokens), summed over those queries and averaged over the head's query group, from the scores
   and the saved log-sum-exp (no second softmax over the whole chunk); a stored slot's mass is
   added to its score in place, the new tokens' are returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baklava.kernels.decode_attention import _load_slots, _quant_mode, _rotate

LOG2E = 1.4426950408889634


@triton.jit
def _tile_update(q, k, v, m_i, l_i, acc, qk_scale, k_scale, v_scale, valid,
                 SCALED: tl.constexpr, MASKED: tl.constexpr, SAFE: tl.constexpr = False):  # fmt: skip
    """One key tile folded into the running (max, sum, output) of a query tile (base-2 exponent).
    ``SCALED``: per-key scales of quantized slots on the logits (``k_scale``) and on the
    probabilities the values are weighted by (``v_scale``); ``MASKED``: ``valid`` applies (a
    head's last stored tile, the chunk's diagonal tiles; whole tiles skip the select); ``SAFE``:
    a row may have seen no key yet (a padded query of a padded chunk), whose max stays ``-inf``
    and must not turn ``-inf - -inf`` into NaN."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if SCALED:
        s = s * k_scale[None, :]
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = m_new
    if SAFE:  # exp2(-inf - 0) = 0 for every key and for the (empty) running sum
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if SCALED:
        acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# per call: a chunk's length S, and the strides it sets (the LSE rows [B, H, S], the valid flags
# [B, S]: specialised on them, a last chunk of another length mod 16 compiled another variant in
# a served run, after the warm-up); a pool row's fill pointer is 16-byte aligned or not by row parity
_PER_CHUNK = ["S", "stride_lb", "stride_lh", "stride_ab"]


@triton.jit(do_not_specialize=_PER_CHUNK, do_not_specialize_on_alignment=["FILL"])
def _attention_kernel(
    Q, K, V, KS, VS, KN, VN, FILL, OFFSETS, OUT, LSE, VALID,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kt, stride_vb, stride_vt,
    stride_ksb, stride_kst, stride_vsb, stride_vst,
    stride_knb, stride_knh, stride_kns, stride_vnb, stride_vnh, stride_vns,
    stride_fb, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ab,
    S, qk_scale,
    GROUP: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, SCALE_GROUP: tl.constexpr, PADDED: tl.constexpr,
):  # fmt: skip
    """Grid ``(ceil(S / BLOCK_Q), H_kv, B)``: ``BLOCK_Q`` queries of every query head of one KV
    head's group as one tile of ``G_P2 x BLOCK_Q`` rows (row ``r``: head ``r // BLOCK_Q`` of the
    group, query ``r % BLOCK_Q``), so each key / value tile is loaded once for the group.
    ``PADDED``: the chunk's tokens ``i`` with ``VALID[b, i] == 0`` are no key to anyone (a padded
    query sees the stored slots only: zeros and ``lse = -inf`` when there are none)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    r = tl.arange(0, G_P2 * BLOCK_Q)
    gi = r // BLOCK_Q
    rows = tile * BLOCK_Q + r % BLOCK_Q  # the chunk's query index of each row
    row_ok = (rows < S) & (gi < GROUP)
    qh = h * GROUP + gi
    d = tl.arange(0, D)
    q = tl.load(
        Q + b * stride_qb + qh[:, None] * stride_qh + rows[:, None] * stride_qs + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    m_i = tl.full([G_P2 * BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P2 * BLOCK_Q], tl.float32)
    acc = tl.zeros([G_P2 * BLOCK_Q, D], tl.float32)

    base = tl.load(OFFSETS + h).to(tl.int64)
    n = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    full = n - n % BLOCK_N
    for j0 in range(0, full, BLOCK_N):  # stored slots: all visible, whole tiles unmasked
        slot = base + j0 + tl.arange(0, BLOCK_N)
        ok = slot >= 0
        k, k_scale = _load_slots(K, KS, b * stride_kb, b * stride_ksb, slot, ok, d, stride_kt, stride_kst,
                                 q.dtype, QUANT, SCALE_GROUP, BLOCK_N, D)  # fmt: skip
        v, v_scale = _load_slots(V, VS, b * stride_vb, b * stride_vsb, slot, ok, d, stride_vt, stride_vst,
                                 q.dtype, QUANT, SCALE_GROUP, BLOCK_N, D)  # fmt: skip
        m_i, l_i, acc = _tile_update(
            q, k, v, m_i, l_i, acc, qk_scale, k_scale, v_scale, ok[None, :], QUANT % 2 == 1, False
        )
    if full < n:  # the head's last, partial tile
        cols = full + tl.arange(0, BLOCK_N)
        ok = cols < n
        k, k_scale = _load_slots(K, KS, b * stride_kb, b * stride_ksb, base + cols, ok, d, stride_kt, stride_kst,
                                 q.dtype, QUANT, SCALE_GROUP, BLOCK_N, D)  # fmt: skip
        v, v_scale = _load_slots(V, VS, b * stride_vb, b * stride_vsb, base + cols, ok, d, stride_vt, stride_vst,
                                 q.dtype, QUANT, SCALE_GROUP, BLOCK_N, D)  # fmt: skip
        m_i, l_i, acc = _tile_update(
            q, k, v, m_i, l_i, acc, qk_scale, k_scale, v_scale, ok[None, :], QUANT % 2 == 1, True
        )

    first = tile * BLOCK_Q
    below = first - first % BLOCK_N  # key tiles wholly before the tile's first query: unmasked
    for j0 in range(0, below, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(KN + b * stride_knb + h * stride_knh + cols[:, None] * stride_kns + d[None, :])
        v = tl.load(VN + b * stride_vnb + h * stride_vnh + cols[:, None] * stride_vns + d[None, :])
        keys_ok = True  # whole tiles: no select, unless padding hides some of their keys
        if PADDED:
            keys_ok = (tl.load(VALID + b * stride_ab + cols) != 0)[None, :]
        m_i, l_i, acc = _tile_update(
            q, k, v, m_i, l_i, acc, qk_scale, qk_scale, qk_scale, keys_ok, False, PADDED, PADDED
        )
    last = tl.minimum(first + BLOCK_Q, S)
    for j0 in range(below, last, BLOCK_N):  # the diagonal: causal
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
        if PADDED:
            visible = visible & (tl.load(VALID + b * stride_ab + cols, mask=ok, other=0) != 0)[None, :]
        m_i, l_i, acc = _tile_update(
            q, k, v, m_i, l_i, acc, qk_scale, qk_scale, qk_scale, visible, False, True, PADDED
        )

    if PADDED:  # a padded query before any valid key, with nothing stored, saw no key: zeros
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")) / 1.4426950408889634
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log-sum-exp of the scaled scores
    tl.store(
        OUT + b * stride_ob + rows[:, None] * stride_os + qh[:, None] * stride_oh + d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + b * stride_lb + qh * stride_lh + rows, lse, mask=row_ok)


@triton.jit(
    do_not_specialize=[*_PER_CHUNK, "OBS", "stride_mb", "stride_mh"],  # the new masses: [B, H_kv, S]
    do_not_specialize_on_alignment=["FILL", "SCORE"],
)
def _mass_kernel(
    Q, K, KS, KN, FILL, OFFSETS, LSE, SCORE, NEW_MASS, VALID,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kt, stride_ksb, stride_kst, stride_knb, stride_knh, stride_kns,
    stride_fb, stride_lb, stride_lh, stride_sb, stride_mb, stride_mh, stride_ab,
    S, OBS, scale,
    GROUP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, SCALE_GROUP: tl.constexpr, PADDED: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    base = tl.load(OFFSETS + h).to(tl.int64)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    if tile * BLOCK_N < fill + S:  # the grid covers the largest head; shorter ones end sooner
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # candidates: [0, fill) stored, [fill, fill + S) new
        stored = cols < fill
        i = cols - fill
        new = (i >= 0) & (i < S)
        d = tl.arange(0, D)
        k_new = tl.load(
            KN + b * stride_knb + h * stride_knh + i[:, None] * stride_kns + d[None, :],
            mask=new[:, None],
            other=0.0,
        )
        k_stored, k_scale = _load_slots(K, KS, b * stride_kb, b * stride_ksb, base + cols, stored, d,
                                        stride_kt, stride_kst, k_new.dtype, QUANT, SCALE_GROUP, BLOCK_N, D)  # fmt: skip
        k = tl.where(stored[:, None], k_stored, k_new)
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
        if QUANT % 2 == 1:  # the stored keys' scales (new tokens are full precision)
            s = s * tl.where(stored, k_scale, 1.0)[None, :]
        visible = r_ok[:, None] & (stored[None, :] | (new[None, :] & (i[None, :] <= qrow[:, None])))
        if PADDED:  # padded queries pay no attention, padded tokens receive none
            q_ok = tl.load(VALID + b * stride_ab + qrow, mask=r_ok, other=0) != 0
            k_ok = stored | (tl.load(VALID + b * stride_ab + i, mask=new, other=0) != 0)
            visible = visible & q_ok[:, None] & k_ok[None, :]
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        mass = tl.sum(p, 0) / GROUP
        score = SCORE + b * stride_sb + base + cols  # this program's columns: no other writes them
        tl.store(score, tl.load(score, mask=stored, other=0.0) + mass, mask=stored)
        tl.store(NEW_MASS + b * stride_mb + h * stride_mh + i, mass, mask=new)


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
    block_m: int | None = None,
    block_n: int = 128,
    num_warps: int | None = None,
    num_stages: int = 3,
    kv_format=None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, S, H_q, D], lse [B, H_q, S] fp32)`` of a chunk (module docstring); ``valid
    [B, S]`` (bool) marks its real tokens when it has padding: a padded token is no key to any
    query, and a padded query attends to the stored slots alone (zeros when there are none).

    ``offsets [H_kv]`` int32 on the device; ``fill [B, H_kv]``. Quantized slots: ``keys/values``
    are the payload and ``key_scales/value_scales [B, C, G]`` their scales, as in
    :func:`~baklava.kernels.decode_attention.packed_decode_attention`; ``query``, ``key_new`` and
    ``value_new`` are full precision. (:func:`observation_masses` takes the same ``query`` and
    ``key_new``: for int4 it rotates them the same way.)
    """
    batch, q_heads, s, dim = query.shape
    kv_heads = key_new.shape[1]
    quant, scale_group, rotated = _quant_mode(kv_format, dim)
    if rotated:  # int4 slots hold rotated vectors: attend in that basis, rotate the output back
        query, key_new, value_new = (_rotate(t) for t in (query, key_new, value_new))
    ks, vs = (key_scales, value_scales) if quant else (fill, fill)  # never read unquantized
    for t in (query, keys, values, key_new, value_new, ks, vs):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    out = query.new_empty(batch, s, q_heads, dim)
    lse = torch.empty(batch, q_heads, s, dtype=torch.float32, device=query.device)
    flags = _valid_flags(valid, fill)
    group = q_heads // kv_heads
    wide = dim >= 128  # an H200 sweep (BENCHMARKS.md): 128 rows / 8 warps at head dim 128, 64 / 4 at 64
    block_m = block_m or (128 if wide else 64)
    num_warps = num_warps or (8 if wide else 4)
    g_p2 = triton.next_power_of_2(group)
    block_q = max(1, block_m // g_p2)  # queries a tile takes of each head of the group
    grid = (triton.cdiv(s, block_q), kv_heads, batch)
    _attention_kernel[grid](
        query, keys, values, ks, vs, key_new, value_new, fill, offsets, out, lse, flags,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1),
        key_new.stride(0), key_new.stride(1), key_new.stride(2),
        value_new.stride(0), value_new.stride(1), value_new.stride(2),
        fill.stride(0), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        flags.stride(0), s, scale * LOG2E,
        GROUP=group, D=dim, BLOCK_N=block_n, QUANT=quant, SCALE_GROUP=scale_group, PADDED=valid is not None,
        num_warps=num_warps, num_stages=num_stages, G_P2=g_p2, BLOCK_Q=block_q,
    )  # fmt: skip
    return (_rotate(out) if rotated else out), lse


def observation_masses(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_new: torch.Tensor,
    fill: torch.Tensor,
    offsets: torch.Tensor,
    lse: torch.Tensor,
    scores: torch.Tensor,
    longest: int,
    obs: int,
    scale: float,
    *,
    block_n: int = 64,
    kv_format=None,
    key_scales: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """SnapKV's masses of the chunk's last ``obs`` queries (``lse``: their log-sum-exp from
    :func:`prefill_attention`): each live stored slot's is added to ``scores [B, C]`` (fp32) in
    place, and the new tokens' are returned, ``[B, H_kv, S]`` fp32. ``longest`` >= every head's
    fill (its capacity will do: programs past a head's ``fill + S`` return at once). Quantized slots
    as in :func:`prefill_attention`. ``valid [B, S]``: as there (padded queries pay no
    attention, padded tokens get none)."""
    batch, q_heads, s, dim = query.shape
    kv_heads = key_new.shape[1]
    group = q_heads // kv_heads
    quant, scale_group, rotated = _quant_mode(kv_format, dim)
    if rotated:
        query, key_new = _rotate(query), _rotate(key_new)
    ks = key_scales if quant else fill  # never read unquantized
    new_mass = torch.empty(batch, kv_heads, s, dtype=torch.float32, device=query.device)
    width = max(16, triton.next_power_of_2(group * obs))
    flags = _valid_flags(valid, fill)
    grid = (triton.cdiv(longest + s, block_n), kv_heads, batch)
    _mass_kernel[grid](
        query, keys, ks, key_new, fill, offsets, lse, scores, new_mass, flags,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), ks.stride(0), ks.stride(1),
        key_new.stride(0), key_new.stride(1), key_new.stride(2),
        fill.stride(0), lse.stride(0), lse.stride(1), scores.stride(0), new_mass.stride(0), new_mass.stride(1),
        flags.stride(0), s, obs, scale,
        GROUP=group, D=dim, W=width, BLOCK_N=block_n, QUANT=quant, SCALE_GROUP=scale_group,
        PADDED=valid is not None,
    )  # fmt: skip
    return new_mass


def _valid_flags(valid: torch.Tensor | None, fill: torch.Tensor) -> torch.Tensor:
    """``valid [B, S]`` as int8 for the kernels (``fill`` as a never-read stand-in without one)."""
    return fill if valid is None else valid.to(torch.int8).contiguous()
