"""``BudgetedAttention`` as one Triton kernel launch: the TensorRT plugin's ahead-of-time kernel.

Contract: ``docs/ops.md`` (``BudgetedAttention``), for any number of new tokens ``S`` (a prefill
chunk or one decode token). TensorRT's ahead-of-time plugins launch exactly one kernel with the
arguments ``(inputs..., scalar extras..., outputs...)`` and no workspace, so this kernel is
written for that ABI:

* inputs ``query [B,H_q,S,D]``, ``key/value [B,H_kv,S,D]``, ``past_key/past_value [B,C,D]``,
  ``past_fill [B,H_kv]`` int64, ``token_mask [B,S]`` bool; extra ``S`` (int32); outputs
  ``output [B,H_q,S,D]``, ``slot_mass [B,C]`` and ``token_mass [B,H_kv,S]`` (fp32), all contiguous;
* the per-head capacities are compile-time constants (the profile is baked into the engine), so
  each program finds its head's slots ``[o_h, o_h + cap_h)`` without a lookup table; so is
  ``kv_dtype``: a quantized format's new keys and values are rounded in registers as the cache
  will give them back (:mod:`baklava.kernels.kv_rounding`) wherever they are read;
* grid ``(ceil(S / BLOCK_M), H_kv, B)``: one program per query tile of one KV head's query group,
  walking the group ``G_CHUNK`` query heads at a time (GQA: those share every key load; a tile of
  at most 64 rows keeps shared memory under 48 KiB, the most a launch gets without opting in).
  Tiles are counted from the end of the chunk, so the last ``obs_window`` queries (whose
  attention is the H2O/SnapKV score) all sit in tile 0, which also writes the masses, adding
  chunk after chunk in one program: no atomics, deterministic.

Flash-attention with an online softmax over the head's live slots, then the chunk's own tokens
(causal, padding masked); tile 0 then re-reads the keys once to turn its logits into
probabilities (``exp(s - lse)``) summed over the observation rows and averaged over the group.
Decode-speed work (split along the cache) lives in :mod:`baklava.kernels.decode_attention`, which the
PyTorch runtime launches as two kernels; TensorRT's one-launch ABI does not allow that split.
"""

from __future__ import annotations

import triton
import triton.language as tl

from baklava.kernels.kv_rounding import round_rows

MASKED = tl.constexpr(-1.0e30)  # finite: a row with nothing allowed stays NaN-free (its output is don't-care)


@triton.jit
def head_extent(CAPS: tl.constexpr, H_KV: tl.constexpr, h):
    """``(cap_h, o_h)`` of KV head ``h`` from the constexpr tuple of capacities."""
    cap = tl.zeros([], tl.int64)
    base = tl.zeros([], tl.int64)
    for i in tl.static_range(H_KV):
        cap = tl.where(h == i, CAPS[i], cap)
        base = tl.where(h > i, base + CAPS[i], base)
    return cap, base


@triton.jit
def _new_tokens(
    PTR, rows, ok, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr, N: tl.constexpr, D: tl.constexpr
):
    """``[N, D]`` keys or values of the step's own tokens (``rows``: element offsets, ``ok``: in
    the chunk), rounded as the cache will give them back (``kv_dtype``; ``docs/ops.md``)."""
    d = tl.arange(0, D)
    x = tl.load(PTR + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    if KV_QUANT != 0:
        x = round_rows(x.to(tl.float32), KV_QUANT, KV_GROUP, N, D).to(x.dtype)
    return x


@triton.jit
def _logits(q, k, SCALE: tl.constexpr):
    return tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE


@triton.jit
def _online_softmax(q, k, v, allowed, m_i, l_i, acc, SCALE: tl.constexpr):
    """Fold one tile of keys/values (``allowed [rows, keys]``) into the running max, sum and output."""
    s = tl.where(allowed, _logits(q, k, SCALE), MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _over_stored(q, K_PAST, V_PAST, b, base, fill, m_i, l_i, acc, TOTAL: tl.constexpr, D: tl.constexpr,
                 SCALE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The head's live slots, which every query may see, folded into the online softmax."""
    d = tl.arange(0, D)
    for j0 in range(0, fill, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        live = j < fill
        rows = (b * TOTAL + base + j) * D
        k = tl.load(K_PAST + rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(V_PAST + rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax(q, k, v, live[None, :], m_i, l_i, acc, SCALE)
    return m_i, l_i, acc


@triton.jit
def _slot_masses(q, K_PAST, SLOT_MASS, b, base, cap, fill, obs, lse, add, TOTAL: tl.constexpr,
                 GROUP: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Each of the head's ``cap`` slots: the probability the ``obs`` rows give it (their logits
    re-read against ``lse``), summed, over the group; 0 past the fill. ``add``: onto what is there."""
    d = tl.arange(0, D)
    for j0 in range(0, cap, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        live = j < fill
        rows = (b * TOTAL + base + j) * D
        k = tl.load(K_PAST + rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        s = _logits(q, k, SCALE)
        p = tl.where(obs[:, None] & live[None, :], tl.exp(tl.minimum(s - lse[:, None], 0.0)), 0.0)
        dst = SLOT_MASS + b * TOTAL + base + j
        prev = tl.load(dst, mask=(j < cap) & add, other=0.0)
        tl.store(dst, prev + tl.sum(p, 0) / GROUP, mask=j < cap)


@triton.jit
def _tile_attention(
    Q, K_NEW, V_NEW, K_PAST, V_PAST, MASK, S, OUT, SLOT_MASS, TOKEN_MASS, b, h, t, g0, base, cap, fill,
    H_KV: tl.constexpr, TOTAL: tl.constexpr, GROUP: tl.constexpr, G_CHUNK: tl.constexpr, D: tl.constexpr,
    SCALE: tl.constexpr, OBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr,
):  # fmt: skip
    """Query heads ``[g0, g0 + G_CHUNK)`` of head ``h``'s group, query tile ``t``."""
    M: tl.constexpr = G_CHUNK * BLOCK_M  # rows: (query head, query) pairs
    r = tl.arange(0, M)
    g = g0 + r // BLOCK_M
    qi = S - (t + 1) * BLOCK_M + (r % BLOCK_M)  # query index; < 0 past the chunk's start
    row_ok = (g < GROUP) & (qi >= 0)
    d = tl.arange(0, D)
    q_rows = ((b * (H_KV * GROUP) + h * GROUP + g) * S + qi) * D
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    q_valid = row_ok & (tl.load(MASK + b * S + qi, mask=row_ok, other=0) != 0)

    m_i = tl.full([M], MASKED, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    m_i, l_i, acc = _over_stored(q, K_PAST, V_PAST, b, base, fill, m_i, l_i, acc, TOTAL, D, SCALE, BLOCK_N)
    # the chunk's own tokens: causal, padding masked; none past this tile's last query
    new_base = (b * H_KV + h) * S
    for j0 in range(0, S - t * BLOCK_M, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        in_chunk = j < S
        k_ok = in_chunk & (tl.load(MASK + b * S + j, mask=in_chunk, other=0) != 0)
        rows = (new_base + j) * D
        k = _new_tokens(K_NEW, rows, in_chunk, KV_QUANT, KV_GROUP, BLOCK_N, D)
        v = _new_tokens(V_NEW, rows, in_chunk, KV_QUANT, KV_GROUP, BLOCK_N, D)
        allowed = k_ok[None, :] & (j[None, :] <= qi[:, None])
        m_i, l_i, acc = _online_softmax(q, k, v, allowed, m_i, l_i, acc, SCALE)
    out = acc / l_i[:, None]
    tl.store(OUT + q_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])

    if t == 0:  # the observation window: attention mass per candidate, summed here over the chunk's heads
        lse = m_i + tl.log(l_i)
        obs = q_valid & (qi >= S - OBS)
        _slot_masses(
            q, K_PAST, SLOT_MASS, b, base, cap, fill, obs, lse, g0 > 0, TOTAL, GROUP, D, SCALE, BLOCK_N
        )
        for j0 in range(0, S, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            in_chunk = j < S
            k_ok = in_chunk & (tl.load(MASK + b * S + j, mask=in_chunk, other=0) != 0)
            rows = (new_base + j) * D
            k = _new_tokens(K_NEW, rows, in_chunk, KV_QUANT, KV_GROUP, BLOCK_N, D)
            s = _logits(q, k, SCALE)
            allowed = obs[:, None] & k_ok[None, :] & (j[None, :] <= qi[:, None])
            p = tl.where(allowed, tl.exp(tl.minimum(s - lse[:, None], 0.0)), 0.0)
            prev = tl.load(TOKEN_MASS + new_base + j, mask=in_chunk & (g0 > 0), other=0.0)
            tl.store(TOKEN_MASS + new_base + j, prev + tl.sum(p, 0) / GROUP, mask=in_chunk)


@triton.jit
def _decode_attention(
    Q, K_NEW, V_NEW, K_PAST, V_PAST, MASK, OUT, SLOT_MASS, TOKEN_MASS, b, h, base, cap, fill,
    H_KV: tl.constexpr, TOTAL: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
    SCALE: tl.constexpr, BLOCK_N: tl.constexpr, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr,
):  # fmt: skip
    """``S = 1``: one row per query head of the group; one pass over keys and values, then one
    over the keys for the masses (the decode step's only query is the observation window)."""
    g = tl.arange(0, ROWS)
    row_ok = g < GROUP
    d = tl.arange(0, D)
    q_rows = (b * (H_KV * GROUP) + h * GROUP + g) * D
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    new_row = tl.full([1], (b * H_KV + h) * D, tl.int64)
    one = tl.full([1], True, tl.int1)
    k_new = tl.reshape(_new_tokens(K_NEW, new_row, one, KV_QUANT, KV_GROUP, 1, D), [D]).to(tl.float32)
    v_new = tl.reshape(_new_tokens(V_NEW, new_row, one, KV_QUANT, KV_GROUP, 1, D), [D]).to(tl.float32)
    valid = tl.load(MASK + b) != 0
    s_new = tl.sum(q.to(tl.float32) * k_new[None, :], 1) * SCALE  # the token sees itself
    m_i = s_new
    l_i = tl.full([ROWS], 1.0, tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32) + v_new[None, :]
    m_i, l_i, acc = _over_stored(q, K_PAST, V_PAST, b, base, fill, m_i, l_i, acc, TOTAL, D, SCALE, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(OUT + q_rows[:, None] + d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    lse = m_i + tl.log(l_i)
    obs = row_ok & valid
    _slot_masses(q, K_PAST, SLOT_MASS, b, base, cap, fill, obs, lse, False, TOTAL, GROUP, D, SCALE, BLOCK_N)
    p_new = tl.where(obs, tl.exp(tl.minimum(s_new - lse, 0.0)), 0.0)
    tl.store(TOKEN_MASS + b * H_KV + h, tl.sum(p_new, 0) / GROUP)


@triton.jit
def budgeted_attention_kernel(
    Q, K_NEW, V_NEW, K_PAST, V_PAST, FILL, MASK,
    S,
    OUT, SLOT_MASS, TOKEN_MASS,
    CAPS: tl.constexpr, H_KV: tl.constexpr, TOTAL: tl.constexpr, GROUP: tl.constexpr, G_CHUNK: tl.constexpr,
    ROWS: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr, OBS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cap, base = head_extent(CAPS, H_KV, h)
    fill = tl.load(FILL + b * H_KV + h).to(tl.int64)
    if S == 1:  # a decode step
        _decode_attention(
            Q, K_NEW, V_NEW, K_PAST, V_PAST, MASK, OUT, SLOT_MASS, TOKEN_MASS, b, h, base, cap, fill,
            H_KV, TOTAL, GROUP, ROWS, D, SCALE, BLOCK_N, KV_QUANT, KV_GROUP,
        )  # fmt: skip
    else:
        for g0 in tl.static_range(0, GROUP, G_CHUNK):
            _tile_attention(
                Q, K_NEW, V_NEW, K_PAST, V_PAST, MASK, S, OUT, SLOT_MASS, TOKEN_MASS, b, h, t, g0, base, cap,
                fill, H_KV, TOTAL, GROUP, G_CHUNK, D, SCALE, OBS, BLOCK_M, BLOCK_N, KV_QUANT, KV_GROUP,
            )  # fmt: skip
            tl.debug_barrier()  # the next chunk adds to the masses this one stored


ROWS = {"fp16": 64, "bf16": 64, "fp32": 32}  # rows a tile holds at once: < 48 KiB shared memory at D = 128


def block_m(obs_window: int) -> int:
    """Queries per tile: the whole observation window fits in tile 0 (at least 16, for ``tl.dot``)."""
    return max(16, triton.next_power_of_2(max(1, obs_window)))


def group_chunk(group: int, block_m: int, dtype: str) -> int:
    """Query heads of a group processed together (a power of two, ``G_CHUNK * BLOCK_M >= 16``)."""
    return min(triton.next_power_of_2(group), max(1, ROWS[dtype] // block_m))
