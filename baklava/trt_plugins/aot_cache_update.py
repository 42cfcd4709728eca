"""``BudgetedCacheUpdate`` as one Triton kernel launch: the TensorRT plugin's ahead-of-time kernel.

Contract: ``docs/ops.md`` (``BudgetedCacheUpdate``), slot for slot: each head keeps its
``min(cap_h, valid candidates)`` highest-priority candidates (stored slots, then the ``S`` new
tokens; equal priorities keep the lower candidate index) and writes them to its slots in
candidate (arrival) order. ABI (TensorRT's ahead-of-time plugins: one launch, no workspace):

* inputs ``past_key, past_value [B,C,D]``, ``past_position [B,C]`` int64, ``past_score [B,C]``
  fp32, ``past_fill [B,H_kv]`` int64, ``seen [B]`` int64, ``key, value [B,H_kv,S,D]``,
  ``token_mask [B,S]`` bool, ``slot_mass [B,C]``, ``token_mass [B,H_kv,S]`` fp32; extra ``S``;
  outputs ``present_*``, which the plugin declares **aliased** to the ``past_*`` inputs: the
  cache is updated in place, and the kernel writes only what changes;
* grid ``(H_kv, B)``, one program per head and row.

Selection without scratch memory: candidates' float64 priorities (>= 0 when valid) order like
their int64 bit patterns. Three cases, by the number ``n`` of valid candidates:

* ``n <= cap``: everything is kept (an append; no search);
* ``n == cap + 1`` (every full decode step): one pass finds the lowest priority, ties going to the
  highest candidate index, and drops that one candidate;
* otherwise (a prefill chunk into a full head): bisection on the bit pattern for the
  ``cap``-th largest priority (64 counting passes), as :mod:`baklava.kernels.prefill_select` did
  before its 16-way search.

Then one ordered pass compacts: the ``r``-th kept candidate goes to slot ``r <= its index``, so a
block only ever writes slots that this or an earlier block already read (a barrier separates a
block's reads from its writes); a stored token that does not move is not rewritten. A new token enters rounded
through the op's ``kv_dtype`` (:mod:`baklava.kernels.kv_rounding`; stored slots were rounded
when they entered). A new token's position counts the valid tokens before it in its row; its H2O score is the SnapKV max-pool of
``token_mass`` (padding as 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from baklava.kernels.cache_update import _priority
from baklava.kernels.kv_rounding import round_rows
from baklava.trt_plugins.aot_attention import head_extent

INVALID = tl.constexpr(-1)  # int64 bits below every valid priority (valid ones are >= 0)


@triton.jit
def _valid_before(MASK, b, S, i0, BLOCK: tl.constexpr):
    """Valid tokens among the chunk's first ``i0`` (``i0 <= 0``: none)."""
    count = tl.zeros([], tl.int64)
    for c0 in range(0, i0, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < i0
        count += tl.sum((tl.load(MASK + b * S + c, mask=ok, other=0) != 0).to(tl.int64), 0)
    return count


@triton.jit
def _candidates(
    POS, SCORE, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S, j,
    TOTAL: tl.constexpr, H_KV: tl.constexpr, SINK: tl.constexpr, WINDOW: tl.constexpr,
    H2O: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``(bits, pos, score)`` of candidates ``j`` (``< fill``: stored slot ``j``; ``cap + i``: new
    token ``i``); ``bits`` is ``INVALID`` for empty slots, padding and the gap ``[fill, cap)``."""
    stored = j < fill
    i = j - cap
    in_chunk = (i >= 0) & (i < S)
    new = in_chunk & (tl.load(MASK + b * S + i, mask=in_chunk, other=0) != 0)
    # positions: stored as they are; new ones count the valid tokens before them in the row
    i0 = tl.min(tl.where(in_chunk, i, S), 0)
    i0 = tl.where(i0 == S, 0, i0)  # a block of stored slots only: nothing to count
    before = _valid_before(MASK, b, S, i0, BLOCK) + tl.cumsum(new.to(tl.int64), 0) - new.to(tl.int64)
    slot = b * TOTAL + base + j
    pos = tl.where(stored, tl.load(POS + slot, mask=stored, other=0), seen + before).to(tl.int64)
    score = tl.load(SCORE + slot, mask=stored, other=0.0)  # ring: stored scores stay, new ones are 0
    if H2O:
        stored_score = score + tl.load(SLOT_MASS + slot, mask=stored, other=0.0)
        pooled = tl.zeros([BLOCK], tl.float32)  # masses are >= 0, padding counts as 0
        for o in tl.static_range(POOL):
            n = i + (o - POOL // 2)
            ok = new & (n >= 0) & (n < S)
            valid_n = tl.load(MASK + b * S + n, mask=ok, other=0) != 0
            m = tl.load(TOKEN_MASS + (b * H_KV + h) * S + n, mask=ok & valid_n, other=0.0)
            pooled = tl.maximum(pooled, m)
        score = tl.where(stored, stored_score, pooled)
    pri = _priority(pos, score, seen_after, SINK, WINDOW, H2O)
    bits = tl.where(stored | new, pri.to(tl.int64, bitcast=True), INVALID)
    return bits, pos, score


@triton.jit
def _count_at_least(
    POS, SCORE, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S, span, t,
    TOTAL: tl.constexpr, H_KV: tl.constexpr, SINK: tl.constexpr, WINDOW: tl.constexpr,
    H2O: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """How many of the first ``span`` candidates have priority bits ``>= t``."""
    count = tl.zeros([], tl.int64)
    for j0 in range(0, span, BLOCK):
        bits, _pos, _score = _candidates(
            POS, SCORE, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S,
            j0 + tl.arange(0, BLOCK), TOTAL, H_KV, SINK, WINDOW, H2O, POOL, BLOCK,
        )  # fmt: skip
        count += tl.sum((bits >= t).to(tl.int64), 0)
    return count


@triton.jit
def _move_rows(PAST, NEW, OUT, src, dst, from_past, from_new, D: tl.constexpr, BLOCK: tl.constexpr,
               KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr):  # fmt: skip
    """Copy the rows that move (from a stored slot or a new token) to their slots, in place: the
    whole block is read before a barrier, and only then written. A new token enters rounded as
    the cache's ``kv_dtype`` gives it back (stored slots were rounded when they entered)."""
    d = tl.arange(0, D)
    new = tl.load(NEW + src[:, None] + d[None, :], mask=from_new[:, None], other=0.0)
    if KV_QUANT != 0:
        new = round_rows(new.to(tl.float32), KV_QUANT, KV_GROUP, BLOCK, D)
    rows = tl.where(
        from_past[:, None],
        tl.load(PAST + src[:, None] + d[None, :], mask=from_past[:, None], other=0.0),
        new.to(PAST.dtype.element_ty),
    )
    tl.debug_barrier()
    tl.store(OUT + dst[:, None] + d[None, :], rows, mask=(from_past | from_new)[:, None])


@triton.jit
def budgeted_cache_update_kernel(
    K_PAST, V_PAST, POS_PAST, SCORE_PAST, FILL_PAST, SEEN, K_NEW, V_NEW, MASK, SLOT_MASS, TOKEN_MASS,
    S,
    K_OUT, V_OUT, POS_OUT, SCORE_OUT, FILL_OUT,
    CAPS: tl.constexpr, H_KV: tl.constexpr, TOTAL: tl.constexpr, D: tl.constexpr,
    SINK: tl.constexpr, WINDOW: tl.constexpr, H2O: tl.constexpr, POOL: tl.constexpr, BLOCK: tl.constexpr,
    KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cap, base = head_extent(CAPS, H_KV, h)
    fill = tl.load(FILL_PAST + b * H_KV + h).to(tl.int64)
    seen = tl.load(SEEN + b).to(tl.int64)
    seen_after = seen + _valid_before(MASK, b, S, S, BLOCK)
    span = cap + S

    # how many candidates are valid, the lowest bits and the last candidate holding them
    n_valid = tl.zeros([], tl.int64)
    low = tl.full([], 0x7FF0000000000000, tl.int64)
    victim = tl.full([], -1, tl.int64)
    for j0 in range(0, span, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        bits, _pos, _score = _candidates(
            POS_PAST, SCORE_PAST, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S, j,
            TOTAL, H_KV, SINK, WINDOW, H2O, POOL, BLOCK,
        )  # fmt: skip
        valid = bits != INVALID
        n_valid += tl.sum(valid.to(tl.int64), 0)
        block_low = tl.min(tl.where(valid, bits, 0x7FF0000000000000), 0)
        block_last = tl.max(tl.where(valid & (bits == block_low), j.to(tl.int64), -1), 0)
        victim = tl.where(
            block_low < low, block_last, tl.where(block_low == low, tl.maximum(victim, block_last), victim)
        )
        low = tl.minimum(low, block_low)
    k = tl.minimum(cap, n_valid)
    drop_one = n_valid == cap + 1

    # general case: the k-th largest bits by bisection (largest t with count(bits >= t) >= k)
    lo = tl.zeros([], tl.int64)
    hi = tl.full([], 0x7FF0000000000000, tl.int64)
    rounds = tl.where(n_valid > cap + 1, 64, 0)
    for _round in range(rounds):
        mid = lo + (hi - lo + 1) // 2
        count = _count_at_least(
            POS_PAST, SCORE_PAST, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S,
            span, mid, TOTAL, H_KV, SINK, WINDOW, H2O, POOL, BLOCK,
        )  # fmt: skip
        ok = count >= k
        lo = tl.where(ok & (lo < hi), mid, lo)
        hi = tl.where(ok | (lo >= hi), hi, mid - 1)
    threshold = tl.where(rounds > 0, lo, 0)
    above = _count_at_least(
        POS_PAST, SCORE_PAST, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S,
        tl.where(rounds > 0, span, 0), threshold + 1, TOTAL, H_KV, SINK, WINDOW, H2O, POOL, BLOCK,
    )  # fmt: skip
    ties_left = k - above

    # ordered pass: the r-th kept candidate goes to slot r (<= its own index)
    written = tl.zeros([], tl.int64)
    for j0 in range(0, span, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        bits, pos, score = _candidates(
            POS_PAST, SCORE_PAST, SLOT_MASS, MASK, TOKEN_MASS, b, h, base, fill, cap, seen, seen_after, S, j,
            TOTAL, H_KV, SINK, WINDOW, H2O, POOL, BLOCK,
        )  # fmt: skip
        valid = bits != INVALID
        if rounds > 0:
            tie = valid & (bits == threshold)
            take_tie = tie & (tl.cumsum(tie.to(tl.int64), 0) - 1 < ties_left)
            keep = (valid & (bits > threshold)) | take_tie
            ties_left -= tl.sum(take_tie.to(tl.int64), 0)
        else:
            keep = valid & ~(drop_one & (j == victim))
        slot = written + tl.cumsum(keep.to(tl.int64), 0) - 1
        written += tl.sum(keep.to(tl.int64), 0)
        stored = j < cap
        moved = keep & (slot != j)
        src = tl.where(stored, (b * TOTAL + base + j) * D, ((b * H_KV + h) * S + (j - cap)) * D)
        dst = (b * TOTAL + base + slot) * D
        _move_rows(
            K_PAST, K_NEW, K_OUT, src, dst, moved & stored, moved & ~stored, D, BLOCK, KV_QUANT, KV_GROUP
        )
        _move_rows(
            V_PAST, V_NEW, V_OUT, src, dst, moved & stored, moved & ~stored, D, BLOCK, KV_QUANT, KV_GROUP
        )
        tl.store(POS_OUT + b * TOTAL + base + slot, pos, mask=keep)
        tl.store(SCORE_OUT + b * TOTAL + base + slot, score, mask=keep)
        tl.debug_barrier()
    tl.store(FILL_OUT + b * H_KV + h, k)
