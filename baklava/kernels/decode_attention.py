"""Triton kernel: decode attention over the packed, ragged per-head cache (flash-decoding).

Contract: :func:`baklava.kernels.reference.packed_decode_attention` (one decode step of
``BudgetedLayer.attend``). Layout: ``keys/values [B, C, D]`` with KV head ``h`` owning slots
``[o_h, o_h + cap_h)`` of which the first ``fill[b, h]`` are live; no padding to the largest head.

Two launches, pointer-and-stride only (what a TensorRT plugin's ``enqueue`` can call):

1. ``_split_kernel`` grid ``(B, n_tiles)``: a static tile table (:func:`tile_table`, from the
   capacities only, so it can be built once per layer and captured in a CUDA graph) cuts every
   head into tiles of one length; each program reads one tile of one head once for the whole
   GQA group (``g`` query heads), keeping an online softmax (``m``, ``l``, ``acc``) in fp32.
   Tiles past ``fill`` write ``m = -inf``. Heads get programs in proportion to their capacity,
   so ragged capacities keep every SM busy.
2. ``_combine_kernel`` grid ``(B, H_q)``, one warp each: merges the tiles of one query head in one
   pass (32 at a time) and the step's own token (``key_new``/``value_new``), writes ``out [B, H_q, D]``.

For the H2O policy (``logits=`` given) the split kernel also writes every live slot's scaled
logits ``[B, C, group]`` (fp32) and the combine kernel each query head's log-sum-exp and the new
token's probability ``[B, H_q]``: the cache-update kernel
(:mod:`baklava.kernels.cache_update`) turns them into the attention each slot
received, without reading the keys a second time (``4 x group`` bytes per slot written and
read, against ``4 x D`` bytes of keys and values in bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from baklava import kv_format as formats
from baklava.kernels import tile_tables
from baklava.kernels.launch import dependent_launch
from baklava.kernels.tile_tables import (  # noqa: F401  (the tables' home; imported from here too)
    SplitTable,
    balanced_table,
    merge_launch,
    multiprocessors,
    split_programs_per_sm,
    tile_length,
    tile_table,
    tiled,
)

# int8 / fp8 slots turn into float16 in PTX the compiler cannot move (_to_half), before tl.dot sees
# them: Triton then stages the converted tile in shared memory and loads it with ldmatrix, as for
# bf16 slots, instead of staging the bytes and rebuilding the value operand with byte permutes
# and conversions one by one (benchmarks/kv/decode_sass.py counts both). The interpreter runs no
# PTX and converts with .to() (the same values: both conversions are exact).
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _to_half(raw, QUANT: tl.constexpr):
    """int8 (QUANT 3) or fp8 e4m3 (QUANT 1) payload as float16, four at a time."""
    if QUANT == 3:  # FasterTransformer's: v ^ 0x80 = v + 128 as a byte under 0x64 is 1024 + v + 128
        x = tl.inline_asm_elementwise(
            "{ .reg .b32 u, m; xor.b32 u, $2, 0x80808080; mov.b32 m, 0x64806480; "
            "prmt.b32 $0, u, 0x64646464, 0x4140; prmt.b32 $1, u, 0x64646464, 0x4342; "
            "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }",
            "=r,=r,r",
            [raw],
            dtype=tl.float16,
            is_pure=False,  # not pure: the compiler would convert after the shared-memory round trip
            pack=4,
        )
    else:
        x = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r",
            [raw.to(tl.uint8, bitcast=True)],
            dtype=tl.float16,
            is_pure=False,
            pack=4,
        )
    return x


@triton.jit
def _load_slots(PTR, SCALES, base_b, scale_b, rows, live, d, stride_t, stride_st, dtype,
                QUANT: tl.constexpr, SCALE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """``[BLOCK_N, D]`` slots of one head for ``tl.dot``, in ``dtype``: full precision as stored
    (QUANT 0); the fp8 (QUANT 1) or int8 (QUANT 3) payload, converted exactly, with its per-slot
    scale returned apart (the caller folds it into the logits or the probabilities); or int4
    nibbles (QUANT 2) scaled by their two-level group scales here (scale returned as ones)."""
    # one return at the end: Triton types every return of a function, taken or not
    slot_scale = tl.full([BLOCK_N], 1.0, tl.float32)
    if QUANT == 2:  # byte j holds channel 2j in its low nibble and 2j + 1 in its high one, each q + 8
        half = tl.arange(0, D // 2)
        byte = tl.load(  # one contiguous load of the slots' bytes; masked slots read 0x88 = (0, 0)
            PTR + base_b + rows[:, None] * stride_t + half[None, :], mask=live[:, None], other=0x88
        ).to(tl.int32)
        # low and high nibbles joined on a last axis of 2, so channels come back interleaved
        nib = tl.reshape(tl.join((byte & 0xF) - 8, (byte >> 4) - 8), (BLOCK_N, D))
        groups = tl.arange(0, D // SCALE_GROUP)
        # two-level scales (kv_format.group_scales), int16 words: float16 top, then a byte a group
        word = (scale_b + rows * stride_st).to(tl.int64)  # [BLOCK_N], in words
        top = tl.load(SCALES + word, mask=live, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        if D // SCALE_GROUP == 1:  # one group: its scale is top, no code
            group_scale = top[:, None] + tl.zeros([BLOCK_N, 1], tl.float32)
        else:
            code = tl.load(
                SCALES.to(tl.pointer_type(tl.uint8)) + (2 * word + 2)[:, None] + groups[None, :],
                mask=live[:, None],
                other=0,
            ).to(tl.float32)
            group_scale = top[:, None] * ((code + 1.0) * (1.0 / 256.0))  # [BLOCK_N, G], exact in fp32
        grouped = tl.reshape(nib.to(tl.float32), (BLOCK_N, D // SCALE_GROUP, SCALE_GROUP))
        x = tl.reshape(grouped * group_scale[:, :, None], (BLOCK_N, D)).to(dtype)
    else:
        x = tl.load(PTR + base_b + rows[:, None] * stride_t + d[None, :], mask=live[:, None], other=0.0)
        if QUANT % 2 == 1 and _PTX:  # float16 holds every int8 / e4m3 value, and so does bfloat16
            x = _to_half(x, QUANT).to(dtype)
        else:
            x = x.to(dtype)
        if QUANT % 2 == 1:
            slot_scale = tl.load(SCALES + scale_b + rows * stride_st, mask=live, other=0.0).to(tl.float32)
    return x, slot_scale


@triton.jit
def _split_kernel(
    Q, K, V, KS, VS, FILL, OFFSETS, TILE_HEAD, TILE_START, MID_O, MID_M, MID_L, LOGITS,
    stride_qb, stride_qh,
    stride_kb, stride_kt,
    stride_vb, stride_vt,
    stride_ksb, stride_kst,
    stride_vsb, stride_vst,
    stride_fb,
    stride_lb, stride_lt,
    scale,
    SPLIT_LEN,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    STORE_LOGITS: tl.constexpr, PDL: tl.constexpr, QUANT: tl.constexpr, SCALE_GROUP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    if PDL:  # launched while the previous kernel drained: wait for it before touching memory
        tl.extra.cuda.gdc_wait()
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
    if QUANT != 0:  # quantized slots are converted to float16 (fp8 has a native conversion to it)
        q = q.to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    end = tl.minimum(start + SPLIT_LEN, fill)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        live = n < end
        rows = (base + n).to(tl.int64)
        k, k_scale = _load_slots(
            K,
            KS,
            b * stride_kb,
            b * stride_ksb,
            rows,
            live,
            d,
            stride_kt,
            stride_kst,
            q.dtype,
            QUANT,
            SCALE_GROUP,
            BLOCK_N,
            D,
        )
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G_PAD, BLOCK_N]; fp32 caches: no TF32
        qk = qk * (k_scale * scale)[None, :]
        qk = tl.where(live[None, :], qk, float("-inf"))
        if STORE_LOGITS:  # [B, C, GROUP]: slot-major, so the update kernel reads a slot's group at once
            tl.store(
                LOGITS + b * stride_lb + rows[None, :] * stride_lt + g[:, None],
                qk,
                mask=live[None, :] & (g < GROUP)[:, None],
            )
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v, v_scale = _load_slots(
            V,
            VS,
            b * stride_vb,
            b * stride_vsb,
            rows,
            live,
            d,
            stride_vt,
            stride_vst,
            q.dtype,
            QUANT,
            SCALE_GROUP,
            BLOCK_N,
            D,
        )
        pv = p * v_scale[None, :]  # a slot's value scale rides on its probability
        acc = acc * alpha[:, None] + tl.dot(pv.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    slot = b * n_tiles + t  # MID_* are contiguous [B, n_tiles, G_PAD(, D)]
    in_group = g < GROUP  # rows past the group only pad tl.dot to 16: not stored
    tl.store(MID_M + slot * G_PAD + g, m_i, mask=in_group)
    tl.store(MID_L + slot * G_PAD + g, l_i, mask=in_group)
    tl.store(MID_O + (slot * G_PAD + g)[:, None] * D + d[None, :], acc, mask=in_group[:, None])


@triton.jit
def _combine_kernel(
    Q, KN, VN, TILE_FIRST, MID_O, MID_M, MID_L, OUT, LSE, LOGIT_NEW,
    stride_qb, stride_qh,
    stride_knb, stride_knh,
    stride_vnb, stride_vnh,
    stride_ob, stride_oh,
    stride_eb,
    scale,
    N_TILES,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, TILE_BLOCK: tl.constexpr,
    STORE_LOGITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    qh = tl.program_id(1)  # one program per query head: a long head's many tiles are read in
    h = qh // GROUP  # blocks of TILE_BLOCK, not one dependent load after another
    gi = qh % GROUP
    d = tl.arange(0, D)
    if PDL:
        tl.extra.cuda.gdc_wait()
    q = tl.load(Q + b * stride_qb + qh * stride_qh + d).to(tl.float32)
    k_new = tl.load(KN + b * stride_knb + h * stride_knh + d).to(tl.float32)
    v_new = tl.load(VN + b * stride_vnb + h * stride_vnh + d).to(tl.float32)
    s_new = tl.sum(q * k_new, 0) * scale  # the step's own token

    first = b * N_TILES + tl.load(TILE_FIRST + h)
    count = tl.load(TILE_FIRST + h + 1) - tl.load(TILE_FIRST + h)
    m = s_new  # one pass, rescaling as the running max grows: a block's m, l and o load together
    num = v_new
    den = tl.full([], 1.0, tl.float32)
    for s0 in range(0, count, TILE_BLOCK):
        t = s0 + tl.arange(0, TILE_BLOCK)
        ok = t < count
        row = (first + t) * G_PAD + gi
        m_t = tl.load(MID_M + row, mask=ok, other=float("-inf"))  # empty tiles: -inf, weight 0
        l_t = tl.load(MID_L + row, mask=ok, other=0.0)
        o_t = tl.load(MID_O + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_t, 0))
        alpha = tl.exp(m - m_new)
        w = tl.exp(m_t - m_new)
        den = den * alpha + tl.sum(l_t * w, 0)
        num = num * alpha + tl.sum(o_t * w[:, None], 0)
        m = m_new
    if STORE_LOGITS:
        tl.store(LSE + b * stride_eb + qh, m + tl.log(den))
        tl.store(LOGIT_NEW + b * stride_eb + qh, s_new)
    tl.store(OUT + b * stride_ob + qh * stride_oh + d, num / den)


def _quant_mode(kv_format, head_dim: int) -> tuple[int, int, bool]:
    """``(QUANT, SCALE_GROUP, rotated)`` of the split kernel for a storage format."""
    fmt = formats.parse(kv_format)
    if not fmt.quantized:
        return 0, head_dim, False
    fmt.check(head_dim)
    if fmt.bits == 4:
        return 2, fmt.group, fmt.rotate
    return (3 if fmt.name == "int8" else 1), head_dim, fmt.rotate


def _rotate(t: torch.Tensor) -> torch.Tensor:
    """``t [..., D]`` rotated by the format's Hadamard matrix (its own inverse), in t's dtype."""
    return formats.hadamard(t.float()).to(t.dtype).contiguous()


MMA_BLOCK_N = 16  # slots a step of the mma split kernel computes
MMA_SUB = 2  # steps a chunk of its shared-memory ring holds (32 slots: 4 KB of int8 keys at D = 128)
MMA_STAGES = 2  # chunks in the ring (one in flight while one is computed)
MMA_MIN_CHUNKS = 8  # the fewest chunks a program of its table reads (each adds a partial to merge)


def mma_split(kv_format, head_dim: int, group: int, device, rows: int | None = None) -> bool:
    """Whether ``kernel="auto"`` runs the mma split kernel: slots and shapes it takes
    (:func:`_mma_takes`) on a CUDA device of compute capability 8.9 or later
    (``cvt.rn.f16x2.e4m3x2``; ``mma.sync`` needs 8.0), not under the interpreter, for more than
    one sequence (``rows``): one sequence alone reads too few slots to fill the SMs, and there
    the Triton kernel was 3-4% faster in two sessions on an H100 (BENCHMARKS.md, issue 23)."""
    device = torch.device(device)
    if device.type != "cuda" or not _PTX or not formats.parse(kv_format).quantized or rows == 1:
        return False
    takes = _mma_takes(_quant_mode(kv_format, head_dim)[0], head_dim, group)
    return takes and torch.cuda.get_device_capability(device) >= (8, 9)


def split_kernel(
    kv_format, head_dim: int, group: int, keys: torch.Tensor, values: torch.Tensor, rows: int
) -> str:
    """What ``kernel="auto"`` runs over ``keys`` / ``values``, chosen for ``rows`` sequences:
    ``"mma"`` where :func:`mma_split` says so and the slots are laid out as the kernel copies them
    (a view may not be), else ``"triton"``. An engine's slot pool chooses once for its whole pool
    (``rows``: its rows) and every step over some of its rows runs that choice, so a row's
    attention is summed the same way alone as beside others."""
    fits = _mma_fits(_quant_mode(kv_format, head_dim)[0], head_dim, group, keys, values)
    return "mma" if fits and mma_split(kv_format, head_dim, group, keys.device, rows) else "triton"


def _mma_fits(quant: int, head_dim: int, group: int, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """The mma split kernel takes these slots (:func:`_mma_takes`) as they are laid out (:func:`_mma_copies`)."""
    return _mma_takes(quant, head_dim, group) and _mma_copies(keys, values)


def _mma_takes(quant: int, head_dim: int, group: int) -> bool:
    """int8 / fp8 slots, power-of-two head dims 32-128 (256 spills: its accumulator alone takes
    128 registers), at most 16 query heads a KV head (one ``mma.sync`` row block)."""
    power = head_dim & (head_dim - 1) == 0
    return quant in (1, 3) and power and 32 <= head_dim <= 128 and group <= 16


def _mma_copies(*slots: torch.Tensor) -> bool:
    """The mma split kernel copies slots in 16-byte pieces (aligned base and row strides) and
    addresses a sequence's slots with 32-bit offsets."""
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0 for t in slots)
    return aligned and all(t.shape[1] * t.stride(1) < 2**31 for t in slots)


def split_table(
    capacities,
    rows: int,
    device,
    mma: bool,
    block_n: int = 64,
    sms: int | None = None,
    per_sm: int | None = None,
    sub: int | None = None,
    min_chunks: int | None = None,
) -> SplitTable:
    """The split pass's table for ``rows`` sequences, built once per layer: for the mma kernel
    :func:`~baklava.kernels.tile_tables.balanced_table` (one wave of one-warp programs, each at
    least ``MMA_MIN_CHUNKS`` chunks) where a row has room for two programs a head; for more rows
    (an engine's slot pool tiles as the whole pool, most rows idle) and for the Triton kernel,
    tiles of one length (``block_n``-slot steps; the mma kernel's chunks). ``sms``: the device's;
    ``per_sm`` (programs an SM, :func:`split_programs_per_sm`), ``sub`` (the mma kernel's steps
    a chunk, ``MMA_SUB``) and ``min_chunks`` (``MMA_MIN_CHUNKS``): the defaults, or a launch a
    benchmark sweeps."""
    sms = sms or multiprocessors(device)
    per_sm = per_sm or split_programs_per_sm(rows, mma)
    if mma:
        chunk = MMA_BLOCK_N * (sub or MMA_SUB)
        if per_sm * sms // rows >= 2 * len(capacities):
            fewest = min_chunks or MMA_MIN_CHUNKS
            return balanced_table(capacities, rows, chunk, sms, per_sm, device, min_steps=fewest)
        block_n = chunk
    return tiled(capacities, tile_length(capacities, rows, block_n, sms, per_sm), device)


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
    logits: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    logit_new: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    merge_block: int | None = None,
    merge_warps: int | None = None,
    kv_format=None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    kernel: str = "auto",
    mma_stages: int | None = None,
    mma_interleave: bool = True,
    mma_sub: int | None = None,
) -> torch.Tensor:
    """Decode attention on the GPU; arguments as the reference, plus ``offsets [H_kv]`` (int32).

    Quantized slots (``kv_format`` fp8 / int8 / int4, :mod:`baklava.kv_format`): ``keys`` and
    ``values`` are the payload (``[B, C, D]`` int8 / float8, ``[B, C, D / 2]`` uint8 for int4) and
    ``key_scales`` / ``value_scales`` their scales ``[B, C, W]`` (float16; int4: int16 words); slots are dequantized in
    registers (the key scale multiplies the logits, the value scale the probabilities, int4
    nibbles are scaled per group before the dot). The step's own token stays full precision.

    ``query [B, H_q, D]``, ``key_new/value_new [B, H_kv, D]``, ``keys/values [B, C, D]`` (last dim
    contiguous), ``fill [B, H_kv]``. ``table`` is :func:`split_table`'s (or a ``(tile,
    tile_table(...))`` pair), built once per layer; without it one is built here. Returns ``[B, H_q, D]`` in the query's dtype.

    With ``logits [B, C, group]``, ``lse [B, H_q]`` and ``logit_new [B, H_q]`` (fp32, last dims
    contiguous) the kernels also write each live slot's scaled logits, each query head's
    log-sum-exp over its slots and the new token, and the new token's logit (what H2O scores
    need: every probability is then ``exp(logit - lse)``, computed one way for all candidates). Slots past ``fill`` are left untouched.

    ``kernel``: the split pass over int8 / fp8 slots on a CUDA device, ``"mma"`` for the Gluon
    kernel that builds tensor-core operands in registers (:mod:`baklava.kernels.decode_mma`, one
    warp a program: give it :func:`split_table`'s, one wave of 8 programs an SM), ``"triton"`` for
    this module's; ``"auto"`` picks :func:`mma_split` (every other format and the interpreter run
    this module's). ``mma_sub``: 16-slot steps a chunk of the mma kernel's shared-memory ring
    holds (default ``MMA_SUB``), ``mma_stages``: chunks in the ring (default ``MMA_STAGES``);
    ``mma_interleave``: a head's programs take its chunks in turn (program ``j`` of ``c`` reads
    chunks ``j, j + c, ...``, so the head's programs stream side by side) instead of one
    contiguous tile each; same work, same partials.

    ``block_n``, ``num_warps``, ``num_stages``: the split launch; ``merge_block`` (tiles read at a
    time) and ``merge_warps``: the merge launch, by default
    :func:`~baklava.kernels.tile_tables.merge_launch` of the table (32 tiles a warp, one block for
    a head's tiles; its few dependent loads are latency, not bandwidth: at batch 64 / 4k a
    32-tile block took 11 us with 4 warps, 4-5 us with one; BENCHMARKS.md).
    """
    batch, q_heads, head_dim = query.shape
    kv_heads = key_new.shape[1]
    if num_stages is None:
        num_stages = 3 if batch <= 2 else 2  # a deeper pipeline pays off for one long sequence
    group = q_heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    quant, scale_group, rotated = _quant_mode(kv_format, head_dim)
    if kernel not in ("auto", "mma", "triton"):
        raise ValueError(f"kernel must be 'auto', 'mma' or 'triton', got {kernel!r}")
    if kernel == "mma" and not _mma_fits(quant, head_dim, group, keys, values):
        raise ValueError(
            f"the mma split kernel takes int8 / fp8 slots of 16-byte rows under 2 GiB a sequence, got {kv_format!r}"
        )
    if kernel == "auto":
        kernel = split_kernel(kv_format, head_dim, group, keys, values, batch)
    mma = kernel == "mma"
    if table is None:
        table = split_table(capacities, batch, query.device, mma)
    tile, (tile_head, tile_start, tile_first) = table[0], table[1]
    if merge_block is None:
        merge_block = merge_launch(table)[0]
    merge_warps = merge_warps or tile_tables.merge_warps(merge_block)
    n_tiles = tile_head.numel()
    f32 = dict(dtype=torch.float32, device=query.device)
    mid_o = torch.empty(batch, n_tiles, g_pad, head_dim, **f32)
    mid_m = torch.empty(batch, n_tiles, g_pad, **f32)
    mid_l = torch.empty(batch, n_tiles, g_pad, **f32)
    out = torch.empty_like(query)
    fill = fill.contiguous()
    store = logits is not None
    if store:
        assert lse is not None and logit_new is not None, "logits, lse and logit_new go together"
        assert logits.shape == (batch, keys.shape[1], group) and logits.stride(-1) == 1
        assert lse.shape == logit_new.shape == (batch, q_heads) and lse.stride() == logit_new.stride()
    else:
        logits = lse = logit_new = mid_m  # never touched: STORE_LOGITS is False
    for t in (query, key_new, value_new, keys, values):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    if rotated:  # slots hold rotated vectors: attend in that basis, rotate the output back
        query, key_new, value_new = (_rotate(t) for t in (query, key_new, value_new))
    if quant:
        assert key_scales is not None and value_scales is not None, "quantized slots need their scales"
        assert key_scales.stride(-1) == 1 and value_scales.stride(-1) == 1
        ks, vs = key_scales, value_scales
    else:
        ks = vs = fill  # never read: QUANT is 0
    pdl = dependent_launch(query.device)
    strides = (
        query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1),
        values.stride(0), values.stride(1),
        ks.stride(0), ks.stride(1),
        vs.stride(0), vs.stride(1),
        fill.stride(0),
        logits.stride(0), logits.stride(1) if store else 0,
    )  # fmt: skip
    if mma:
        from baklava.kernels.decode_mma import _split_kernel_mma

        assert tile % MMA_BLOCK_N == 0, f"the mma split kernel reads tiles of {MMA_BLOCK_N}-slot steps"
        _split_kernel_mma[(batch, n_tiles)](
            query, keys, values, ks, vs, fill, offsets, tile_head, tile_start, tile_first, mid_o, mid_m, mid_l,
            logits, *strides, scale, tile,
            GROUP=group, G_PAD=16, D=head_dim, BLOCK_N=MMA_BLOCK_N, STORE_LOGITS=store, QUANT=quant,
            STAGES=mma_stages or MMA_STAGES, PDL=pdl, INTERLEAVE=mma_interleave, SUB=mma_sub or MMA_SUB,
            num_warps=1, launch_pdl=pdl,
        )  # fmt: skip
    else:
        _split_kernel[(batch, n_tiles)](
            query, keys, values, ks, vs, fill, offsets, tile_head, tile_start, mid_o, mid_m, mid_l, logits,
            *strides, scale, tile,
            GROUP=group, G_PAD=g_pad, D=head_dim, BLOCK_N=block_n, STORE_LOGITS=store, PDL=pdl,
            QUANT=quant, SCALE_GROUP=scale_group,
            num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
        )  # fmt: skip
    _combine_kernel[(batch, q_heads)](
        query, key_new, value_new, tile_first, mid_o, mid_m, mid_l, out, lse, logit_new,
        query.stride(0), query.stride(1),
        key_new.stride(0), key_new.stride(1),
        value_new.stride(0), value_new.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0) if store else 0,
        scale, n_tiles,
        GROUP=group, G_PAD=g_pad, D=head_dim, TILE_BLOCK=merge_block, STORE_LOGITS=store, PDL=pdl,
        num_warps=merge_warps, launch_pdl=pdl,
    )  # fmt: skip
    return _rotate(out) if rotated else out
