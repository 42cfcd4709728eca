"""Triton kernels: compress a prefill chunk into the packed cache, every head of a layer at once.

Contract: the evicting branch of :meth:`baklava.runtime.packed_cache.BudgetedLayer._commit_head`
(and ``docs/ops.md``, ``BudgetedCacheUpdate``): head ``h``'s candidates are its ``fill[b, h]``
stored slots followed by the chunk's ``S`` new tokens; each gets the priority of
:func:`baklava.runtime.selection.keep_priority` (sink > recent window > score or position,
``-inf`` for padding); the ``min(cap_h, valid candidates)`` highest are kept (equal priorities:
the lower candidate index, i.e. the older token, as ONNX ``TopK``) and written to the head's slots
in candidate (arrival) order.

Three steps:

1. ``_bits_kernel`` grid ``(B, H_kv, ceil(span / BLOCK))``: every candidate's priority as int64 bits
   (valid priorities are >= 0, so the bits order like the values; -1 for no candidate) into
   ``[B, H_kv, max(cap) + S]``, candidate ``j`` at column ``j``: ``j`` for stored slot ``j``,
   ``cap_h + i`` for new token ``i``;
2. :func:`keep_indices`: one stable descending sort of every head's row at once, each candidate's
   rank, the ``min(cap_h, valid)`` first kept, listed in candidate order (a prefix sum) from the
   head's first slot, and the new fill. (It replaced a one-program-per-head 16-way search over
   the bits, 20 passes over the candidates on ``B x H_kv`` programs: 0.48 ms a layer of a 32k
   prefill at budget 0.3 on an H200, 15% of the chunked prefill's GPU time.)
3. ``_move_kernel`` grid ``(B, H_kv, ceil(max cap / BLOCK))``, twice, **in place**: a kept stored
   slot only moves towards its head's start, so the first launch copies the moved slots (keys,
   values, positions, scores) to scratch and the second writes them, and the chunk's kept
   tokens, into their slots; slots that keep their own content and slots past the new fill are
   not touched, and no per-chunk zero-filled buffer is made. Quantized slots
   (:mod:`baklava.runtime.kv_slots`) take two more launches for their scales, with the same kept
   indices: a slot's payload and scales stay together, byte for byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baklava.kernels.cache_update import _priority

NEG_BITS = tl.constexpr(-1)  # int64 bits of padding candidates: below every valid priority (those are >= 0)


@triton.jit
def _candidate_bits(
    POS, SCORE, NEW_POS, NEW_SCORE, NEW_VALID, b, h, base, fill, j,
    stride_pb, stride_sb, stride_npb, stride_nsb, stride_nsh, stride_nvb,
    seen_after, sink, window, CAP, S, H2O: tl.constexpr,
):  # fmt: skip
    """int64 bit patterns of the priorities of candidates ``j`` (``< fill``: stored slot ``j``;
    ``CAP .. CAP + S - 1``: new token ``j - CAP``), ``NEG_BITS`` where ``j`` is not a valid candidate."""
    stored = j < fill
    i = j - CAP
    in_chunk = (i >= 0) & (i < S)
    new = in_chunk & (tl.load(NEW_VALID + b * stride_nvb + i, mask=in_chunk, other=0) != 0)
    pos = tl.where(
        stored,
        tl.load(POS + b * stride_pb + base + j, mask=stored, other=0),
        tl.load(NEW_POS + b * stride_npb + i, mask=new, other=0),
    ).to(tl.int64)
    score = tl.where(
        stored,
        tl.load(SCORE + b * stride_sb + base + j, mask=stored, other=0.0),
        tl.load(NEW_SCORE + b * stride_nsb + h * stride_nsh + i, mask=new, other=0.0),
    )
    pri = _priority(pos, score, seen_after, sink, window, H2O)
    return tl.where(stored | new, pri.to(tl.int64, bitcast=True), NEG_BITS)


# Arguments that differ from call to call in a batching engine: a row of a slot pool starts at
# row x sum(cap) elements (so its positions / scores / fill pointers are 16-byte aligned or not by
# the row's parity), each layer has its own sum(cap) (the row strides), and a prompt's last chunk
# has any length (the bits' row stride is max(cap) + that length). Specialising on them compiled a
# new variant for most combinations: on an H200 a budget-0.3 engine run spent 51 s in prefill
# against 11 s at budget 1.0 (all rows aligned), over 200 new files in Triton's cache. The kernels load these one element at a time, so the hints buy
# nothing here.
_PER_CALL_INTS = [
    "stride_pb",
    "stride_sb",
    "stride_npb",
    "stride_nsb",
    "stride_nsh",
    "stride_nvb",
    "stride_kb",
    "stride_kh",
]
_ROW_POINTERS = ["POS", "SCORE", "FILL"]


@triton.jit(do_not_specialize=[*_PER_CALL_INTS, "S", "SPAN"], do_not_specialize_on_alignment=_ROW_POINTERS)
def _bits_kernel(
    POS, SCORE, FILL, NEW_POS, NEW_SCORE, NEW_VALID, SEEN_AFTER, CAPS, OFFSETS, BITS,
    stride_pb, stride_sb, stride_fb,
    stride_npb, stride_nsb, stride_nsh, stride_nvb,
    stride_kb, stride_kh,
    S, SPAN, sink, window,
    H2O: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(b, h, block)``: the priority bits of ``BLOCK`` of head ``h``'s candidate indices
    (``[0, fill)`` stored, ``[cap, cap + S)`` new, ``NEG_BITS`` elsewhere up to ``SPAN``)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    cap = tl.load(CAPS + h).to(tl.int64)
    base = tl.load(OFFSETS + h).to(tl.int64)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    seen_after = tl.load(SEEN_AFTER + b).to(tl.int64)
    bits = _candidate_bits(
        POS, SCORE, NEW_POS, NEW_SCORE, NEW_VALID, b, h, base, fill, j,
        stride_pb, stride_sb, stride_npb, stride_nsb, stride_nsh, stride_nvb,
        seen_after, sink, window, cap, S, H2O,
    )  # fmt: skip
    tl.store(BITS + b * stride_kb + h * stride_kh + j, bits, mask=j < SPAN)


def keep_indices(bits: torch.Tensor, capacities: torch.Tensor, offsets: torch.Tensor, total: int):
    """``(keep [B, total] int32, new_fill [B, H])`` from each head's candidate priority bits
    ``bits [B, H, span]`` (int64, valid candidates >= 0): the ``min(cap, valid)`` highest of a head,
    equal bits going to the lower candidate index (a stable descending sort: the reference's
    ``TopK`` order), listed in candidate order from the head's first slot (``offsets``)."""
    batch, heads, span = bits.shape
    order = torch.sort(bits.view(batch * heads, span), dim=1, descending=True, stable=True).indices
    cand = torch.arange(span, device=bits.device)
    rank = torch.empty_like(order).scatter_(1, order, cand.expand_as(order)).view(batch, heads, span)
    new_fill = torch.minimum((bits >= 0).sum(-1), capacities.to(torch.int64))
    kept = rank < new_fill[..., None]
    slot = offsets.to(torch.int64)[:, None] + kept.cumsum(-1) - 1
    dest = torch.where(kept, slot, total).view(batch, heads * span)  # column `total`: the dropped
    keep = torch.zeros(batch, total + 1, dtype=torch.int32, device=bits.device)
    keep.scatter_(1, dest, cand.to(torch.int32).repeat(heads).expand(batch, -1))
    return keep[:, :total], new_fill


@triton.jit
def _gather_rows(
    SRC, NEW, b, h, base, j, i, stored, new, d, col, stride_b, stride_t, stride_nb, stride_nh, stride_ns
):
    """Kept rows ``[BLOCK, width]`` of one slot tensor: stored slot ``base + j`` or the chunk's token
    ``i``; ``col [1, width]`` masks the columns past the tensor's width."""
    return tl.where(
        stored[:, None],
        tl.load(
            SRC + b * stride_b + (base + j)[:, None] * stride_t + d[None, :],
            mask=stored[:, None] & col,
            other=0,
        ),
        tl.load(
            NEW + b * stride_nb + h * stride_nh + i[:, None] * stride_ns + d[None, :],
            mask=new[:, None] & col,
            other=0,
        ),
    )


@triton.jit(
    do_not_specialize=["stride_pb", "stride_sb", "stride_npb", "stride_nsb", "stride_nsh", "stride_keb"],
    do_not_specialize_on_alignment=["POS", "SCORE", "POS_S", "SCORE_S"],
)
def _move_kernel(
    K, V, POS, SCORE, KN, VN, NEW_POS, NEW_SCORE, KEEP, NEW_FILL, CAPS, OFFSETS,
    K_S, V_S, POS_S, SCORE_S,
    stride_kb, stride_kt, stride_vb, stride_vt, stride_pb, stride_sb,
    stride_knb, stride_knh, stride_kns, stride_vnb, stride_vnh, stride_vns,
    stride_npb, stride_nsb, stride_nsh,
    stride_keb, stride_nfb,
    stride_ksb, stride_kst, stride_vsb, stride_vst, stride_psb, stride_ssb,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, META: tl.constexpr, STAGE: tl.constexpr,
):  # fmt: skip
    """Program ``(b, h, block)`` over the kept slots ``o`` of one pair of slot tensors (keys and
    values, or their scales: ``D`` is their width, ``D_PAD`` the next power of two: int4's scales
    are 3 float16 words a vector), and with ``META`` their positions and scores.
    Slot ``o`` keeps candidate ``j = KEEP[o]``: itself when ``j == o`` (nothing moves), stored slot
    ``j > o`` (moved), or the chunk's token ``j - cap`` (new). ``STAGE``: copy the moved slots'
    contents to the scratch tensors (``*_S``, at ``o``); otherwise write every moved and new slot
    in place from the scratch or the chunk. Two launches, so no program reads a slot another has
    already overwritten."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    cap = tl.load(CAPS + h).to(tl.int64)
    base = tl.load(OFFSETS + h).to(tl.int64)
    n = tl.minimum(tl.load(NEW_FILL + b * stride_nfb + h).to(tl.int64), cap)
    o = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    live = o < n
    j = tl.load(KEEP + b * stride_keb + base + o, mask=live, other=0).to(tl.int64)
    moved = live & (j < cap) & (j != o)
    new = live & (j >= cap)
    i = j - cap
    d = tl.arange(0, D_PAD)
    col = d[None, :] < D
    rows = base + o
    if STAGE:
        src = (base + j)[:, None]
        keep = moved[:, None] & col
        k = tl.load(K + b * stride_kb + src * stride_kt + d[None, :], mask=keep, other=0)
        v = tl.load(V + b * stride_vb + src * stride_vt + d[None, :], mask=keep, other=0)
        tl.store(K_S + b * stride_ksb + rows[:, None] * stride_kst + d[None, :], k, mask=keep)
        tl.store(V_S + b * stride_vsb + rows[:, None] * stride_vst + d[None, :], v, mask=keep)
        if META:
            pos = tl.load(POS + b * stride_pb + base + j, mask=moved, other=0)
            score = tl.load(SCORE + b * stride_sb + base + j, mask=moved, other=0.0)
            tl.store(POS_S + b * stride_psb + rows, pos, mask=moved)
            tl.store(SCORE_S + b * stride_ssb + rows, score, mask=moved)
    else:
        write = moved | new
        k = _gather_rows(
            K_S,
            KN,
            b,
            h,
            base,
            o,
            i,
            moved,
            new,
            d,
            col,
            stride_ksb,
            stride_kst,
            stride_knb,
            stride_knh,
            stride_kns,
        )
        v = _gather_rows(
            V_S,
            VN,
            b,
            h,
            base,
            o,
            i,
            moved,
            new,
            d,
            col,
            stride_vsb,
            stride_vst,
            stride_vnb,
            stride_vnh,
            stride_vns,
        )
        tl.store(K + b * stride_kb + rows[:, None] * stride_kt + d[None, :], k, mask=write[:, None] & col)
        tl.store(V + b * stride_vb + rows[:, None] * stride_vt + d[None, :], v, mask=write[:, None] & col)
        if META:
            pos = tl.where(
                moved,
                tl.load(POS_S + b * stride_psb + rows, mask=moved, other=0),
                tl.load(NEW_POS + b * stride_npb + i, mask=new, other=0),
            )
            score = tl.where(
                moved,
                tl.load(SCORE_S + b * stride_ssb + rows, mask=moved, other=0.0),
                tl.load(NEW_SCORE + b * stride_nsb + h * stride_nsh + i, mask=new, other=0.0),
            )
            tl.store(POS + b * stride_pb + rows, pos.to(POS.dtype.element_ty), mask=write)
            tl.store(SCORE + b * stride_sb + rows, score, mask=write)


def packed_prefill_select(
    slots,
    positions: torch.Tensor,
    scores: torch.Tensor,
    fill: torch.Tensor,
    new_positions: torch.Tensor,
    new_scores: torch.Tensor,
    new_valid: torch.Tensor,
    seen_after: torch.Tensor,
    capacities: list[int],
    offsets: torch.Tensor,
    *,
    sink: int,
    window: int,
    policy: str,
    device_capacities: torch.Tensor | None = None,
    block: int = 1024,
):
    """Keep each head's highest-priority candidates, **in place**: the slot tensors, ``positions``,
    ``scores`` and ``fill`` are updated and returned as ``(*slot tensors, positions, scores,
    fill)``. Slots past a head's new fill are not touched (a prefill's fill only grows, so they
    still hold what the cache was reset to).

    ``slots``: pairs of slot tensors with the chunk's rows, ``[(keys, values, key_new,
    value_new)]`` (stored ``[B, C, width]``, new ``[B, H_kv, S, width]``; quantized slots add
    ``(key_scales, value_scales, key_scales_new, value_scales_new)``: a slot's payload and scales
    are kept together); ``positions [B, C]`` (int), ``scores [B, C]`` fp32 (already holding this
    chunk's attention to the stored slots), ``fill [B, H_kv]``; ``new_positions [B, S]``,
    ``new_scores [B, H_kv, S]`` (fp32, pooled), ``new_valid [B, S]``; ``seen_after [B]`` (real
    tokens once the chunk is in); ``offsets [H_kv]`` int32 on the device, and ``device_capacities`` the
    capacities there (built from ``capacities`` when not given: a copy to the device each call).
    """
    if policy not in ("h2o", "ring"):
        raise ValueError(f"unknown eviction policy {policy!r}")
    batch, kv_heads, chunk = slots[0][2].shape[:3]
    dev = positions.device
    caps_t = device_capacities
    if caps_t is None:
        caps_t = torch.tensor(capacities, dtype=torch.int32, device=dev)
    new_valid = new_valid.to(torch.int8)
    for t in (t for pair in slots for t in pair):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    span = max(capacities) + chunk
    bits = torch.empty(batch, kv_heads, span, dtype=torch.int64, device=dev)
    _bits_kernel[(batch, kv_heads, triton.cdiv(span, block))](
        positions, scores, fill, new_positions, new_scores, new_valid, seen_after, caps_t, offsets, bits,
        positions.stride(0), scores.stride(0), fill.stride(0),
        new_positions.stride(0), new_scores.stride(0), new_scores.stride(1), new_valid.stride(0),
        bits.stride(0), bits.stride(1),
        chunk, span, sink, window,
        H2O=policy == "h2o", BLOCK=block,
    )  # fmt: skip
    keep, new_fill = keep_indices(bits, caps_t, offsets, positions.shape[1])
    # a kept stored slot moves only towards the head's start (j > o): its old place may be another
    # kept slot's new one, so the moved ones go through scratch (uninitialised: only they are read)
    pos_s, score_s = torch.empty_like(positions), torch.empty_like(scores)
    move_block = 64
    grid = (batch, kv_heads, triton.cdiv(max(capacities), move_block))
    for index, (keys, values, key_new, value_new) in enumerate(slots):
        k_s, v_s = torch.empty_like(keys), torch.empty_like(values)
        for stage in (True, False):
            _move_kernel[grid](
                keys, values, positions, scores, key_new, value_new, new_positions, new_scores, keep, new_fill,
                caps_t, offsets, k_s, v_s, pos_s, score_s,
                keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), positions.stride(0), scores.stride(0),
                key_new.stride(0), key_new.stride(1), key_new.stride(2),
                value_new.stride(0), value_new.stride(1), value_new.stride(2),
                new_positions.stride(0), new_scores.stride(0), new_scores.stride(1),
                keep.stride(0), new_fill.stride(0),
                k_s.stride(0), k_s.stride(1), v_s.stride(0), v_s.stride(1), pos_s.stride(0), score_s.stride(0),
                D=key_new.shape[-1], D_PAD=triton.next_power_of_2(key_new.shape[-1]), BLOCK=move_block, META=index == 0, STAGE=stage,
            )  # fmt: skip
    fill.copy_(new_fill)
    return (*(t for pair in slots for t in pair[:2]), positions, scores, fill)
