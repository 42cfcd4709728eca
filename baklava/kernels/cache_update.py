"""Triton kernel: commit one decode token per KV head into the packed cache, evicting in place.

Contract: the one-token commit of :meth:`baklava.runtime.packed_cache.BudgetedLayer.attend`
(``runtime/packed_decode.py`` and the per-head loop), with one deliberate difference in layout:

* H2O: every live slot's score grows by the attention it received in this step, averaged over
  the query group (``mean_g exp(logit - lse_g)``, from what the decode-attention kernel wrote);
  the new token's score is its own probability, computed the same way (so equal logits give
  equal scores, as in the reference's softmax);
* a head with room appends the token at slot ``fill``;
* a full head finds its lowest-priority slot (:mod:`baklava.runtime.selection`: sink > recent
  window > score or position; ties drop the newest, i.e. the largest position) and, if the new
  token's priority is higher, **overwrites that slot**. The reference shifts the later slots left
  to keep arrival order; the kernel does not, because a shift moves up to a whole head of keys
  and values every step (more bytes than the attention reads). Attention does not depend on slot
  order and ties are broken by position, not slot index, so the kept tokens are the same set;
  the tests compare heads as sets ordered by position.

Two launches over the decode-attention kernel's tile table:

1. ``_score_kernel`` grid ``(B, tiles)``: each program adds the step's attention to one tile's
   scores and writes the tile's lowest priority, its position and slot (reads ``4 x group + 12``
   bytes per live slot: logits, score, position);
2. ``_commit_kernel`` grid ``(B, H_kv)``: appends, or reduces the head's tile minima to the
   victim and overwrites it (one write of ``D`` keys and values).

(A first version ran the whole head in one program: a serial loop over up to 16k slots, about
0.3 ms a layer at budget 1.0, which took a Llama-3-8B decode step to twice its floor.) Rows with
``valid == 0`` (padding) change nothing. Pointer and stride arguments only, no host sync: it runs
inside a CUDA graph, and a TensorRT plugin's ``enqueue`` can launch it as is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TIER = tl.constexpr(1e15)  # must equal baklava.runtime.selection.TIER


@triton.jit
def _priority(pos, score, seen_after, sink, window, H2O: tl.constexpr):
    """float64 priority as :func:`baklava.runtime.selection.keep_priority` (valid candidates)."""
    p = pos.to(tl.float64)
    if H2O:
        body = score.to(tl.float64)
    else:
        body = p
    pri = tl.where(pos >= seen_after - window, 2 * TIER + p, body)
    return tl.where(pos < sink, 3 * TIER - p, pri)


@triton.jit
def _keep_lowest(pri, pos, slot, best_pri, best_pos, best_slot):
    """Fold a block of candidates (``pri`` +inf where absent) into the running lowest priority;
    ties go to the largest position (the newest token is dropped first)."""
    low = tl.min(pri, 0)
    low_pos = tl.max(tl.where(pri == low, pos, -1), 0)
    low_slot = tl.max(tl.where((pri == low) & (pos == low_pos), slot, -1), 0)
    better = (low < best_pri) | ((low == best_pri) & (low_pos > best_pos))
    return (
        tl.where(better, low, best_pri),
        tl.where(better, low_pos, best_pos),
        tl.where(better, low_slot, best_slot),
    )


@triton.jit
def _score_kernel(
    POS, SCORE, FILL, SEEN, VALID, OFFSETS, TILE_HEAD, TILE_START, LOGITS, LSE, MIN_PRI, MIN_POS, MIN_SLOT,
    stride_pb, stride_sb, stride_fb,
    stride_lb, stride_lt,
    stride_eb,
    sink, window, SPLIT_LEN,
    H2O: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(b, t)``: one tile of one head. Adds the step's attention to the tile's scores
    (H2O) and writes the tile's lowest priority (ties: largest position) and its slot."""
    b = tl.program_id(0)
    t = tl.program_id(1)
    h = tl.load(TILE_HEAD + t)
    start = tl.load(TILE_START + t).to(tl.int64)
    base = tl.load(OFFSETS + h).to(tl.int64)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int64)
    end = tl.minimum(start + SPLIT_LEN, fill)
    if tl.load(VALID + b) == 0:
        end = start  # padding row: nothing changes
    seen_after = tl.load(SEEN + b).to(tl.int64) + 1
    g = tl.arange(0, G_PAD)
    in_group = g < GROUP
    if H2O:
        lse = tl.load(LSE + b * stride_eb + h * GROUP + g, mask=in_group, other=float("inf"))
    best_pri = tl.full([], float("inf"), tl.float64)
    best_pos = tl.full([], -1, tl.int64)
    best_slot = tl.full([], -1, tl.int64)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        live = n < end
        rows = base + n
        score = tl.load(SCORE + b * stride_sb + rows, mask=live, other=0.0)
        if H2O:
            logit = tl.load(
                LOGITS + b * stride_lb + rows[:, None] * stride_lt + g[None, :],
                mask=live[:, None] & in_group[None, :],
                other=float("-inf"),
            )
            score += tl.sum(tl.exp(logit - lse[None, :]), 1) / GROUP
            tl.store(SCORE + b * stride_sb + rows, score, mask=live)
        pos = tl.load(POS + b * stride_pb + rows, mask=live, other=0).to(tl.int64)
        pri = tl.where(live, _priority(pos, score, seen_after, sink, window, H2O), float("inf"))
        pos = tl.where(live, pos, -1)
        best_pri, best_pos, best_slot = _keep_lowest(pri, pos, rows, best_pri, best_pos, best_slot)
    n_tiles = tl.num_programs(1)
    tl.store(MIN_PRI + b * n_tiles + t, best_pri)
    tl.store(MIN_POS + b * n_tiles + t, best_pos)
    tl.store(MIN_SLOT + b * n_tiles + t, best_slot)


@triton.jit
def _commit_kernel(
    K, V, POS, SCORE, FILL, SEEN, VALID, CAPS, OFFSETS, TILE_FIRST, MIN_PRI, MIN_POS, MIN_SLOT,
    KN, VN, LSE, LOGIT_NEW, KS, VS, KSN, VSN,
    stride_kb, stride_kt,
    stride_vb, stride_vt,
    stride_pb, stride_sb, stride_fb,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_eb,
    stride_ksb, stride_kst, stride_vsb, stride_vst,
    stride_ksnb, stride_ksnh, stride_vsnb, stride_vsnh,
    sink, window, N_TILES,
    H2O: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, TILE_BLOCK: tl.constexpr,
    N_SCALES: tl.constexpr, SCALES_PAD: tl.constexpr,
):  # fmt: skip
    """Program ``(b, h)``: append the token, or find the head's victim among its tiles' minima
    and overwrite it if the new token's priority is higher. Quantized slots (``N_SCALES`` > 0):
    ``D`` is the payload's width and the token's ``N_SCALES`` scales move with it."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if tl.load(VALID + b) != 0:
        cap = tl.load(CAPS + h).to(tl.int64)
        base = tl.load(OFFSETS + h).to(tl.int64)
        fill = tl.load(FILL + b * stride_fb + h).to(tl.int64)
        new_pos = tl.load(SEEN + b).to(tl.int64)  # this token's position: real tokens before it
        seen_after = new_pos + 1
        new_score = 0.0
        if H2O:
            g = tl.arange(0, G_PAD)
            in_group = g < GROUP
            lse = tl.load(LSE + b * stride_eb + h * GROUP + g, mask=in_group, other=float("inf"))
            logit_new = tl.load(LOGIT_NEW + b * stride_eb + h * GROUP + g, mask=in_group, other=float("-inf"))
            new_score = tl.sum(tl.exp(logit_new - lse), 0) / GROUP  # as for the stored slots: ties stay ties
        dest = tl.full([], -1, tl.int64)
        if fill < cap:
            dest = base + fill
            tl.store(FILL + b * stride_fb + h, (fill + 1).to(FILL.dtype.element_ty))
        else:
            first = tl.load(TILE_FIRST + h)
            count = tl.load(TILE_FIRST + h + 1) - first
            best_pri = tl.full([], float("inf"), tl.float64)
            best_pos = tl.full([], -1, tl.int64)
            best_slot = tl.full([], -1, tl.int64)
            for s0 in range(0, count, TILE_BLOCK):
                s = s0 + tl.arange(0, TILE_BLOCK)
                ok = s < count
                idx = b * N_TILES + first + s
                pri = tl.load(MIN_PRI + idx, mask=ok, other=float("inf"))
                pos = tl.load(MIN_POS + idx, mask=ok, other=-1)
                slot = tl.load(MIN_SLOT + idx, mask=ok, other=-1)
                best_pri, best_pos, best_slot = _keep_lowest(pri, pos, slot, best_pri, best_pos, best_slot)
            new_pri = _priority(new_pos, new_score, seen_after, sink, window, H2O)
            if new_pri > best_pri:  # equal: the new token is the newest of the lowest, it goes
                dest = best_slot
        if dest >= 0:
            d = tl.arange(0, D)
            k = tl.load(KN + b * stride_knb + h * stride_knh + d)
            v = tl.load(VN + b * stride_vnb + h * stride_vnh + d)
            tl.store(K + b * stride_kb + dest * stride_kt + d, k.to(K.dtype.element_ty))
            tl.store(V + b * stride_vb + dest * stride_vt + d, v.to(V.dtype.element_ty))
            if N_SCALES > 0:
                c = tl.arange(0, SCALES_PAD)  # int4's 3 words a vector: padded to a power of two
                word = c < N_SCALES
                ks = tl.load(KSN + b * stride_ksnb + h * stride_ksnh + c, mask=word)
                vs = tl.load(VSN + b * stride_vsnb + h * stride_vsnh + c, mask=word)
                tl.store(KS + b * stride_ksb + dest * stride_kst + c, ks, mask=word)
                tl.store(VS + b * stride_vsb + dest * stride_vst + c, vs, mask=word)
            tl.store(POS + b * stride_pb + dest, new_pos.to(POS.dtype.element_ty))
            tl.store(SCORE + b * stride_sb + dest, new_score)


def packed_cache_update(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    fill: torch.Tensor,
    valid_seen: torch.Tensor,
    valid: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    capacities: torch.Tensor,
    offsets: torch.Tensor,
    *,
    sink: int,
    window: int,
    policy: str,
    logits: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    logit_new: torch.Tensor | None = None,
    table=None,
    block: int = 512,
    warps: int = 8,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    key_scales_new: torch.Tensor | None = None,
    value_scales_new: torch.Tensor | None = None,
) -> None:
    """Commit ``key_new/value_new [B, H_kv, D]`` in place (see the module docstring).

    Quantized slots (:mod:`baklava.runtime.kv_slots`): ``keys/values`` and ``key_new/value_new``
    are payload (``D`` its width, fp8 as its uint8 bits), and ``key_scales/value_scales
    [B, C, G]`` take the token's ``key_scales_new/value_scales_new [B, H_kv, G]`` (float16; int4: int16 words).

    ``keys/values [B, C, D]``, ``positions [B, C]`` (int), ``scores [B, C]`` fp32,
    ``fill [B, H_kv]`` (int, updated), ``valid_seen [B]`` (the new token's position; the caller
    advances it), ``valid [B]`` (bool or int: False rows change nothing), ``capacities`` and
    ``offsets [H_kv]`` (int32, on the device). ``policy="h2o"`` needs the decode-attention
    kernel's ``logits [B, C, group]``, ``lse`` and ``logit_new [B, H_q]`` of this step.
    ``table`` is the decode-attention kernel's (``split_table``) read as contiguous tiles: the score pass runs one
    program per tile, so a long head is not one program's serial loop.
    """
    if policy not in ("h2o", "ring"):
        raise ValueError(f"unknown eviction policy {policy!r}")
    batch, kv_heads, head_dim = key_new.shape
    h2o = policy == "h2o"
    if h2o:
        assert logits is not None and lse is not None and logit_new is not None, (
            "h2o needs this step's attention"
        )
        group = logits.shape[-1]
        assert logits.stride(-1) == 1 and lse.stride() == logit_new.stride() and lse.stride(-1) == 1
    else:
        group = 1
        logits = lse = logit_new = scores  # never read
    quantized = key_scales is not None
    if quantized:
        assert value_scales is not None and key_scales_new is not None and value_scales_new is not None
        n_scales = key_scales.shape[-1]
    else:
        n_scales = 0
        key_scales = value_scales = key_scales_new = value_scales_new = scores  # never read
    for t in (keys, values, key_new, value_new, key_scales, value_scales, key_scales_new, value_scales_new):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    assert scores.dtype == torch.float32 and positions.stride(-1) == 1 and scores.stride(-1) == 1
    assert fill.stride(-1) == 1
    if table is None:
        from baklava.kernels.decode_attention import split_table

        table = split_table(capacities.tolist(), batch, keys.device, mma=False)
    tile, (tile_head, tile_start, tile_first) = table[0], table[1]
    n_tiles = tile_head.numel()
    if valid.dtype not in (torch.bool, torch.int8):
        valid = valid.to(torch.int8)
    min_pri = torch.empty(batch, n_tiles, dtype=torch.float64, device=keys.device)
    min_pos = torch.empty(batch, n_tiles, dtype=torch.int64, device=keys.device)
    min_slot = torch.empty(batch, n_tiles, dtype=torch.int64, device=keys.device)
    g_pad = max(2, triton.next_power_of_2(group))
    _score_kernel[(batch, n_tiles)](
        positions, scores, fill, valid_seen, valid, offsets, tile_head, tile_start, logits, lse,
        min_pri, min_pos, min_slot,
        positions.stride(0), scores.stride(0), fill.stride(0),
        logits.stride(0) if h2o else 0, logits.stride(1) if h2o else 0,
        lse.stride(0) if h2o else 0,
        sink, window, tile,
        H2O=h2o, GROUP=group, G_PAD=g_pad, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    _commit_kernel[(batch, kv_heads)](
        keys, values, positions, scores, fill, valid_seen, valid, capacities, offsets, tile_first,
        min_pri, min_pos, min_slot,
        key_new, value_new, lse, logit_new, key_scales, value_scales, key_scales_new, value_scales_new,
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        positions.stride(0), scores.stride(0), fill.stride(0),
        key_new.stride(0), key_new.stride(1),
        value_new.stride(0), value_new.stride(1),
        lse.stride(0) if h2o else 0,
        key_scales.stride(0), key_scales.stride(1) if quantized else 0,
        value_scales.stride(0), value_scales.stride(1) if quantized else 0,
        key_scales_new.stride(0), key_scales_new.stride(1) if quantized else 0,
        value_scales_new.stride(0), value_scales_new.stride(1) if quantized else 0,
        sink, window, n_tiles,
        H2O=h2o, GROUP=group, G_PAD=g_pad, D=head_dim, TILE_BLOCK=16, N_SCALES=n_scales,
        SCALES_PAD=max(1, triton.next_power_of_2(n_scales)),
    )  # fmt: skip
