"""Gluon kernel: decode attention's split pass over int8 / fp8 slots, tensor-core operands built in
registers (CUDA only; the Triton kernel of :mod:`baklava.kernels.decode_attention` stays the
reference implementation, the interpreter's path and every other format's).

Why a second kernel. ``tl.dot`` takes its operands through shared memory: Triton stages an 8-bit
tile there, reads it back, converts it and writes it again as float16 for ``ldmatrix`` (which
cannot transpose 8-bit elements), so the int8 kernel spends per byte what the bf16 one does per
two and reads its half-size slots only ~1.3x faster (BENCHMARKS.md, issue 23). Here every slot
goes from global memory straight into the registers ``mma.sync`` reads, converted there:

* Slots reach shared memory by ``cp.async`` into a ring of two 32-slot chunks, one in flight
  while the other is computed in two 16-slot steps. Each copy instruction moves whole slots (a
  warp's 512 contiguous bytes: four 128-byte int8 slots at D = 128), and the steps read the
  chunk back in the operand layouts below (``LDS``, after the barrier the copy needs): no
  conversion pass through shared memory, no ``ldmatrix``.
* The key tile is the B operand of ``Q @ K^T``, contracted over channels. A thread of
  ``mma.m16n8k16`` holds channels ``2t, 2t+1, 2t+8, 2t+9`` (+16 a step) of its slots; the
  contraction does not care which channel is called which, so channels are renamed (the query
  the same way) until each thread's 32 (D = 128) are 32 contiguous bytes of its slot.
* The value tile is the B operand of ``P @ V``, whose output columns are free to permute: column
  ``n`` of the product is stored channel ``(D / 8) * (n % 8) + n // 8``, which gives each thread
  16 contiguous bytes of a slot.
* The renaming is a reshape / permute of the loaded tile (layout only, no data moves), so the
  loaded tile is already in the MMA operand layout (``convert_layout(..., assert_trivial)`` up to
  the order of a thread's registers).
* One warp a program: it owns its steps end to end (online softmax in registers, the rescale of
  its accumulator skipped when no row's maximum rose), 8 programs an SM, all in one wave
  (:func:`baklava.kernels.tile_tables.balanced_table`). The ``c`` programs of a head take its
  chunks in turn (program ``j`` reads chunks ``j, j + c, ...``), so they stream side by side
  through the head instead of each through a distant tile (3% faster on an H100).

Same contract and launch tables as ``_split_kernel`` (it writes the same ``MID_*`` partials, so
``_combine_kernel`` merges them unchanged); float16 operands with float32 accumulation, as the
Triton kernel's.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

_MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
_DOT_A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA.value, k_width=2))
_DOT_B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=_MMA.value, k_width=2))
_RING = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))


LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _exp2(x):
    """2^x, flushing subnormal results to 0 (one MUFU.EX2, no range fix-up)."""
    return gl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _fetch(stage, rows, live):
    """cp.async of one tile's 32-bit words into a ring stage; slots past the tile's end read 0."""
    async_copy.async_copy_global_to_shared(stage, rows, mask=live[:, None])


@gluon.constexpr_function
def _within(k, sub, block_n):
    """Slot offset of the ``k``-th BLOCK_N step from a chunk's start, within its chunk."""
    return (k % sub) * block_n


@gluon.constexpr_function
def _chunks(k, sub):
    """Chunks (of ``sub`` steps) the ``k``-th step from a chunk's start lies ahead."""
    return k // sub


@gluon.constexpr_function
def _bits(n):
    assert n >= 1 and n & (n - 1) == 0, f"{n} is not a power of two"
    return n.bit_length() - 1


@gluon.constexpr_function
def copy_layout(d):
    """A chunk of ``d``-channel 8-bit slots as 32-bit words, laid out for ``cp.async``: 16 bytes a
    thread, a warp's copy ``512 / d`` whole consecutive slots (contiguous in memory: 16 sectors
    fully read, where the operand layouts would read half of 32)."""
    return gl.BlockedLayout([1, 4], [512 // d, d // 16], [1, 1], [1, 0])


@gluon.constexpr_function
def key_layout(block_n, words):
    """The key tile as stored, ``[block_n, words]`` 32-bit words of four channels, laid out so
    that renaming its channels (:func:`_renamed_channels`) gives ``mma.sync``'s B operand: a
    thread's ``D / 4`` channels of a slot are contiguous."""
    regs = [[0, 1 << i] for i in range(_bits(words) - 2)] + [[1 << i, 0] for i in range(3, _bits(block_n))]
    lanes = [[0, words // 4], [0, words // 2], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [block_n, words])


@gluon.constexpr_function
def value_layout(block_n, words):
    """The value tile as stored, ``[block_n, words]`` 32-bit words, laid out so that renaming its
    channels (:func:`_value_columns`) gives ``mma.sync``'s B operand: ``D / 8`` contiguous
    channels of a slot a thread."""
    regs = [[0, 1 << i] for i in range(_bits(words) - 3)] + [[1, 0]]
    regs += [[1 << i, 0] for i in range(3, _bits(block_n))]
    lanes = [[2, 0], [4, 0], [0, words // 8], [0, words // 4], [0, words // 2]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [block_n, words])


@gluon.constexpr_function
def _split_channels(rows, d):
    """``[rows, d]`` with the channel index cut into its bits, most significant first."""
    return tuple([rows] + [2] * _bits(d))


@gluon.constexpr_function
def _contraction_order(d, rows_last):
    """Channel bits as stored ``(b2, b1, b_{p-1} .. b3, b0)`` to the renamed order
    ``(b_{p-1} .. b0)``, the row axis first or last."""
    p = _bits(d)
    bits = list(range(3, p)) + [1, 2, p]
    return tuple(bits + [0] if rows_last else [0] + bits)


@gluon.constexpr_function
def _renamed_shape(rows, d, rows_last):
    return (d, rows) if rows_last else (rows, d)


@gluon.jit
def _renamed_channels(x, ROWS: gl.constexpr, D: gl.constexpr, ROWS_LAST: gl.constexpr):
    """``x [ROWS, D]`` (stored channel order) with channels renamed for the contraction; transposed
    to ``[D, ROWS]`` when ``ROWS_LAST``. Stored channel ``32t + l`` (D = 128) is renamed so that
    thread ``t`` of a quad owns it in the MMA layout (the query goes through the same renaming)."""
    SPLIT: gl.constexpr = _split_channels(ROWS, D)
    ORDER: gl.constexpr = _contraction_order(D, ROWS_LAST)
    x = gl.reshape(x, SPLIT)
    x = gl.permute(x, ORDER.value)
    SHAPE: gl.constexpr = _renamed_shape(ROWS, D, ROWS_LAST)
    return gl.reshape(x, SHAPE)


@gluon.jit
def _value_columns(y, BLOCK_N: gl.constexpr, D: gl.constexpr):
    """``y [BLOCK_N, D]`` as stored to the value operand: column ``n`` is stored channel
    ``(D / 8) * (n % 8) + n // 8``."""
    y = gl.reshape(y, [BLOCK_N, 8, D // 8])
    y = gl.permute(y, [0, 2, 1])
    return gl.reshape(y, [BLOCK_N, D])


# a 32-bit word of four payload bytes -> two float16 pairs (bytes 0, 1 and 2, 3), exact.
# int8, FasterTransformer's: v ^ 0x80 = v + 128 as a byte under 0x64 is the float16 1024 + v + 128
_INT8_TO_HALF2 = gl.constexpr(
    "{ .reg .b32 u, m; xor.b32 u, $2, 0x80808080; mov.b32 m, 0x64806480; "
    "prmt.b32 $0, u, 0x64646464, 0x4140; prmt.b32 $1, u, 0x64646464, 0x4342; "
    "sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }"
)
_E4M3_TO_HALF2 = gl.constexpr(
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }"
)


@gluon.jit
def _to_half(words, ROWS: gl.constexpr, D: gl.constexpr, QUANT: gl.constexpr):
    """``words [ROWS, D / 4]`` of int8 (QUANT 3) or fp8 e4m3 (QUANT 1) payload as float16
    ``[ROWS, D]`` (exact): each word becomes two float16 pairs, each pair two halves."""
    CONVERT: gl.constexpr = _INT8_TO_HALF2 if QUANT == 3 else _E4M3_TO_HALF2
    lo, hi = gl.inline_asm_elementwise(
        CONVERT, "=r,=r,r", [words], dtype=(gl.int32, gl.int32), is_pure=True, pack=1
    )
    pairs = gl.join(lo, hi)  # [ROWS, D / 4, 2]: channel pairs (0, 1) and (2, 3) of a word
    first, second = gl.inline_asm_elementwise(
        "mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs], dtype=(gl.float16, gl.float16), is_pure=True, pack=1
    )
    return gl.reshape(gl.join(first, second), [ROWS, D])


@gluon.jit
def _split_kernel_mma(
    Q, K, V, KS, VS, FILL, OFFSETS, TILE_HEAD, TILE_START, TILE_FIRST, MID_O, MID_M, MID_L, LOGITS,
    stride_qb, stride_qh,
    stride_kb, stride_kt,
    stride_vb, stride_vt,
    stride_ksb, stride_kst,
    stride_vsb, stride_vst,
    stride_fb,
    stride_lb, stride_lt,
    scale,
    SPLIT_LEN,
    GROUP: gl.constexpr, G_PAD: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
    STORE_LOGITS: gl.constexpr, QUANT: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr,
    INTERLEAVE: gl.constexpr, SUB: gl.constexpr,
):  # fmt: skip
    gl.static_assert(STAGES >= 2, "a ring of at least two chunks: one computed, one in flight")
    gl.static_assert(G_PAD == 16, "one mma.sync row block: the group padded to 16 query heads")
    LK: gl.constexpr = key_layout(BLOCK_N, D // 4)
    LV: gl.constexpr = value_layout(BLOCK_N, D // 4)
    LQ: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, 1], [1, 0])
    ROW: gl.constexpr = gl.SliceLayout(1, _MMA)  # a query head's value: m, l
    COL: gl.constexpr = gl.SliceLayout(0, _MMA)  # a slot's value: scales, liveness

    CHUNK: gl.constexpr = BLOCK_N * SUB  # slots a ring stage holds, computed BLOCK_N at a time
    LC: gl.constexpr = copy_layout(D)

    b = gl.program_id(0)
    t = gl.program_id(1)
    n_tiles = gl.num_programs(1)
    if PDL:  # launched while the previous kernel drained: wait for it before touching memory
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )
    h = gl.load(TILE_HEAD + t)
    fill = gl.load(FILL + b * stride_fb + h).to(gl.int32)
    base = gl.load(OFFSETS + h).to(gl.int64)
    if INTERLEAVE:  # the head's programs take its chunks in turn: neighbours read side by side
        first = gl.load(TILE_FIRST + h)
        start = (t - first) * CHUNK
        step = (gl.load(TILE_FIRST + h + 1) - first) * CHUNK
        end = fill
    else:  # one contiguous tile of the table
        start = gl.load(TILE_START + t)
        step = CHUNK
        end = gl.minimum(start + SPLIT_LEN, fill)

    gq = gl.arange(0, G_PAD, layout=gl.SliceLayout(1, LQ))
    dq = gl.arange(0, D, layout=gl.SliceLayout(0, LQ))
    q = gl.load(
        Q + b * stride_qb + (h * GROUP + gq)[:, None] * stride_qh + dq[None, :],
        mask=(gq < GROUP)[:, None],
        other=0.0,
    ).to(gl.float16)
    q = gl.convert_layout(_renamed_channels(q, G_PAD, D, False), _DOT_A)

    cn = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, LC))
    cd = gl.arange(0, D // 4, layout=gl.SliceLayout(0, LC))  # in 32-bit words
    sn = gl.arange(0, BLOCK_N, layout=COL)
    g = gl.arange(0, G_PAD, layout=ROW)
    # slots as 32-bit words: a thread's bytes load in 16-byte vectors and stay four to a register;
    # a chunk's addresses are one scalar base and 32-bit offsets (a head's slots of one sequence
    # span < 2^31 bytes, the host checks)
    k_head = (K + b * stride_kb).to(gl.pointer_type(gl.int32)) + base * (stride_kt // 4)
    v_head = (V + b * stride_vb).to(gl.pointer_type(gl.int32)) + base * (stride_vt // 4)
    k_off = cn[:, None] * (stride_kt // 4) + cd[None, :]
    v_off = cn[:, None] * (stride_vt // 4) + cd[None, :]
    ks_head = KS + b * stride_ksb + base * stride_kst
    vs_head = VS + b * stride_vsb + base * stride_vst

    # A ring of STAGES chunks in shared memory, filled by cp.async STAGES - 1 chunks ahead of the
    # chunk computed (whole slots a copy; the steps read them back in the operand layouts), so a
    # warp keeps (STAGES - 1) x CHUNK slots in flight without holding registers; the scales come
    # two BLOCK_N steps ahead in registers.
    ring_k = gl.allocate_shared_memory(gl.int32, [STAGES, CHUNK, D // 4], _RING)
    ring_v = gl.allocate_shared_memory(gl.int32, [STAGES, CHUNK, D // 4], _RING)
    for i in gl.static_range(STAGES - 1):
        n_i = start + i * step
        _fetch(ring_k.index(i), k_head + n_i * (stride_kt // 4) + k_off, n_i + cn < end)
        _fetch(ring_v.index(i), v_head + n_i * (stride_vt // 4) + v_off, n_i + cn < end)
        async_copy.commit_group()
    s0 = start + sn
    s1 = start + _within(1, SUB, BLOCK_N) + _chunks(1, SUB) * step + sn
    k_scale = gl.load(ks_head + s0 * stride_kst, mask=s0 < end, other=0.0)
    v_scale = gl.load(vs_head + s0 * stride_vst, mask=s0 < end, other=0.0)
    k_scale_1 = gl.load(ks_head + s1 * stride_kst, mask=s1 < end, other=0.0)
    v_scale_1 = gl.load(vs_head + s1 * stride_vst, mask=s1 < end, other=0.0)

    m_i = gl.full([G_PAD], float("-inf"), gl.float32, layout=ROW)
    l_i = gl.zeros([G_PAD], gl.float32, layout=ROW)
    acc = gl.zeros([G_PAD, D], gl.float32, layout=_MMA)
    stage = 0
    for n0 in range(start, end, step):
        ahead = n0 + (STAGES - 1) * step  # into the stage the last iteration read
        _fetch(
            ring_k.index((stage + STAGES - 1) % STAGES),
            k_head + ahead * (stride_kt // 4) + k_off,
            ahead + cn < end,
        )
        _fetch(
            ring_v.index((stage + STAGES - 1) % STAGES),
            v_head + ahead * (stride_vt // 4) + v_off,
            ahead + cn < end,
        )
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)  # this chunk's copies have landed
        for s in gl.static_range(SUB):
            s2 = n0 + _within(s + 2, SUB, BLOCK_N) + _chunks(s + 2, SUB) * step + sn
            k_scale_2 = gl.load(ks_head + s2 * stride_kst, mask=s2 < end, other=0.0)
            v_scale_2 = gl.load(vs_head + s2 * stride_vst, mask=s2 < end, other=0.0)
            k = _to_half(ring_k.index(stage).slice(s * BLOCK_N, BLOCK_N).load(LK), BLOCK_N, D, QUANT)
            k = gl.convert_layout(
                _renamed_channels(k, BLOCK_N, D, True), _DOT_B, assert_trivial=True
            )  # [D, BLOCK_N]
            qk = mma_v2(q, k, gl.zeros([G_PAD, BLOCK_N], gl.float32, layout=_MMA))
            n = n0 + s * BLOCK_N + sn
            live = n < end
            qk = qk * (k_scale.to(gl.float32) * (scale * LOG2E))[None, :]  # base-2 logits
            qk = gl.where(live[None, :], qk, float("-inf"))
            if STORE_LOGITS:
                gl.store(
                    LOGITS + b * stride_lb + (base + n)[None, :] * stride_lt + g[:, None],
                    qk * LN2,
                    mask=live[None, :] & (g < GROUP)[:, None],
                )
            m_new = gl.maximum(m_i, gl.max(qk, 1))
            alpha = _exp2(m_i - m_new)
            p = _exp2(qk - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            p = gl.convert_layout(
                (p * v_scale.to(gl.float32)[None, :]).to(gl.float16), _DOT_A, assert_trivial=True
            )
            v = _to_half(ring_v.index(stage).slice(s * BLOCK_N, BLOCK_N).load(LV), BLOCK_N, D, QUANT)
            v = gl.convert_layout(_value_columns(v, BLOCK_N, D), _DOT_B, assert_trivial=True)
            if gl.max(m_new - m_i, 0) > 0:  # a row's max rose (rare after the first steps): rescale
                acc = acc * alpha[:, None]
            acc = mma_v2(p, v, acc)
            m_i = m_new
            k_scale, k_scale_1 = k_scale_1, k_scale_2
            v_scale, v_scale_1 = v_scale_1, v_scale_2
        stage = (stage + 1) % STAGES
    async_copy.wait_group(0)  # no copy outlives the ring

    slot = b * n_tiles + t  # MID_* are contiguous [B, n_tiles, G_PAD(, D)]
    in_group = g < GROUP
    gl.store(MID_M + slot * G_PAD + g, m_i * LN2, mask=in_group)  # natural log, as the merge reads
    gl.store(MID_L + slot * G_PAD + g, l_i, mask=in_group)
    col = gl.arange(0, D, layout=COL)
    channel = (D // 8) * (col % 8) + col // 8  # the value operand's column order, undone
    gl.store(MID_O + (slot * G_PAD + g)[:, None] * D + channel[None, :], acc, mask=in_group[:, None])


def split_launch(
    quant: int,
    *,
    head_dim: int,
    group: int,
    store_logits: bool = False,
    stages: int = 2,
    interleave: bool = True,
    sub: int = 2,
) -> dict:
    """One launch of :func:`_split_kernel_mma` described for :mod:`baklava.kernels.offline_compile`
    (pointers and row strides 16-aligned, as the host wrapper requires), to compile it without a
    GPU: int8 (``quant`` 3) or fp8 (1) slots."""
    payload = "int8" if quant == 3 else "float8_e4m3fn"
    tensors = {"Q": "bfloat16", "K": payload, "V": payload, "KS": "float16", "VS": "float16",
               "FILL": "int32", "OFFSETS": "int32", "TILE_HEAD": "int32", "TILE_START": "int32", "TILE_FIRST": "int32",
               "MID_O": "float32", "MID_M": "float32", "MID_L": "float32", "LOGITS": "float32"}  # fmt: skip
    consts = dict(GROUP=group, G_PAD=16, D=head_dim, BLOCK_N=16, STORE_LOGITS=store_logits, QUANT=quant,
                  STAGES=stages, PDL=True, INTERLEAVE=interleave, SUB=sub)  # fmt: skip
    one = {"stride_ksb", "stride_kst", "stride_vsb", "stride_vst", "stride_fb", "stride_lt"}
    args = []
    for name in _split_kernel_mma.arg_names:
        if name in consts:
            kind = "bool" if isinstance(consts[name], bool) else "int"
            args.append([kind, consts[name]])
        elif name in tensors:
            args.append(["tensor", tensors[name], True])
        elif name == "scale":
            args.append(["float", 0.088])
        else:
            args.append(["int", group if name == "stride_lt" else 1 if name in one else 4096])
    return {"module": __name__, "name": "_split_kernel_mma", "jit": {}, "args": args,
            "kwargs": {"num_warps": ["int", 1]}}  # fmt: skip
