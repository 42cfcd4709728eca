"""Triton: token-head vectors rounded in registers as a quantized cache gives them back.

:func:`baklava.kv_format.round_trip` for a tile of rows, bit for bit: the same float32
operations in the same order, with IEEE divisions. It serves kernels whose cache holds the
model's dtype and rounds each token as it enters: the TensorRT plugins' ahead-of-time kernels,
which implement the ONNX ops' ``kv_dtype`` (``baklava/exporter/ops/kv_round_trip.py``) and so
hold the values ONNX Runtime and the PyTorch reference store hold.

Three pieces are written out here instead of taken from Triton, so that the interpreter (CI)
and the GPU compute the same bits:

* round half to even is ``(x + 1.5 * 2^23) - 1.5 * 2^23`` (exact for ``|x| < 2^22``; libdevice's
  ``rint`` has no interpreter twin);
* float8 e4m3 rounding works from the exponent bits: the value's own step, ``2^(e - 3)``, or
  ``2^-9`` below the smallest normal ``2^-6`` (the interpreter's float8 cast drops a mantissa
  carry into the binade below: 125.9 came back as 64);
* the Hadamard rotation of int4 is :func:`~baklava.kv_format.hadamard`'s butterflies, as
  reshapes, splits and joins, in its order.

A kernel that rounds int4 vectors must be compiled without floating-point contraction
(``enable_fp_fusion=False``): the rotation adds products the reference rounds one by one.
"""

from __future__ import annotations

import triton
import triton.language as tl

from baklava import kv_format

NONE, FP8, INT4, INT8 = 0, 1, 2, 3  # what a kernel's KV_QUANT constexpr says (as decode attention's)
_QMAX = {FP8: 448.0, INT4: 7.0, INT8: 127.0}
_TINY = tl.constexpr(2.0**-14)  # kv_format._TINY: an all-zero vector keeps a usable scale
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding it rounds a float32 to an integer, ties to even


def rounding(kv_dtype, head_dim: int) -> dict:
    """The constexprs of a kernel that rounds ``head_dim``-channel vectors through ``kv_dtype``:
    ``KV_QUANT`` (0: full precision) and ``KV_GROUP`` (channels a scale); a one-line
    ``BaklavaError`` for a head dimension the format cannot take."""
    fmt = kv_format.parse(kv_dtype)
    if not fmt.quantized:
        return {"KV_QUANT": NONE, "KV_GROUP": head_dim}
    fmt.check(head_dim)
    quant = INT4 if fmt.bits == 4 else FP8 if fmt.name == "fp8" else INT8
    assert _QMAX[quant] == fmt.qmax and fmt.rotate == (quant == INT4)
    return {"KV_QUANT": quant, "KV_GROUP": fmt.group or head_dim}


@triton.jit
def _rint(x):
    """``x`` (float32, ``|x| < 2^22``) rounded to an integer, ties to even (``torch.round``)."""
    return (x + _MAGIC) - _MAGIC


@triton.jit
def _e4m3(x):
    """``x`` (float32, ``|x| <= 448``) rounded to the nearest float8 e4m3 value, ties to even, as
    PyTorch's cast: a step of ``2^(e - 3)`` for exponent ``e`` (three mantissa bits), ``2^-9``
    below ``2^-6``; the sign kept (a negative value that rounds to zero is ``-0``)."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    per_step = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 1 / step, exact
    size = _rint(tl.abs(x) * per_step) * step
    # the sign bit put back (Triton's negation is 0 - x: it would turn -0 into +0)
    return (size.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def hadamard_rows(x, ROWS: tl.constexpr, D: tl.constexpr):
    """``x [ROWS, D]`` (float32, ``D`` a power of two up to 2^15) times the orthonormal Hadamard
    matrix: :func:`baklava.kv_format.hadamard`'s butterflies, in its order."""
    y = x
    for i in tl.static_range(15):
        if (1 << i) < D:  # blocks of 2h = 2 << i channels: each pairs its halves
            pairs = tl.permute(tl.reshape(y, [ROWS, D // (2 << i), 2, 1 << i]), [0, 1, 3, 2])
            a, b = tl.split(pairs)  # [ROWS, D / 2h, h]: the first and second half of each block
            y = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2]), [ROWS, D])
    return y * D**-0.5


@triton.jit
def quantize_rows(x, KV_QUANT: tl.constexpr):
    """``x [ROWS, D]`` (float32) quantized a row at a time with one float16 scale (fp8: KV_QUANT
    1, int8: 3; :func:`baklava.kv_format.quantize`): ``(q, scale)``, ``q [ROWS, D]`` the payload's
    values as float32 (integers, or float8 e4m3 values) and ``scale [ROWS]`` the stored scale's."""
    QMAX: tl.constexpr = 448.0 if KV_QUANT == 1 else 127.0
    want = tl.div_rn(tl.max(tl.abs(x), 1), QMAX)
    scale = tl.maximum(want, _TINY).to(tl.float16).to(tl.float32)
    q = tl.div_rn(x, scale[:, None])
    if KV_QUANT == 1:
        q = _e4m3(tl.minimum(tl.maximum(q, -QMAX), QMAX))
    else:
        q = tl.minimum(tl.maximum(_rint(q), -QMAX), QMAX)
    return q, scale


@triton.jit
def quantize_groups(x, KV_GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """``x [ROWS, D]`` (float32, already rotated) quantized to int4 with a scale per ``KV_GROUP``
    channels in two levels (:func:`baklava.kv_format.quantize`): ``(q, scale, top, code)``,
    ``q [ROWS, D]`` the integers in [-7, 7] as float32, ``scale [ROWS, G]`` each group's,
    ``top [ROWS]`` the float16 top and ``code [ROWS, G]`` the byte codes as float32 (``G`` = 1:
    the scale is ``top``, no code)."""
    G: tl.constexpr = D // KV_GROUP
    g = tl.reshape(x, [ROWS, G, KV_GROUP])
    want = tl.div_rn(tl.max(tl.abs(g), 2), 7.0)  # [ROWS, G]
    top = tl.maximum(tl.max(want, 1), _TINY).to(tl.float16).to(tl.float32)  # [ROWS]
    if G > 1:  # two levels: a float16 top, a byte code a group
        code = tl.minimum(tl.maximum(_rint(tl.div_rn(want * 256.0, top[:, None])) - 1.0, 0.0), 255.0)
        scale = top[:, None] * ((code + 1.0) * (1.0 / 256.0))
    else:  # one group: its scale is top, no code
        code = tl.zeros([ROWS, G], tl.float32)
        scale = top[:, None] + code
    q = tl.minimum(tl.maximum(_rint(tl.div_rn(g, scale[:, :, None])), -7.0), 7.0)
    return tl.reshape(q, [ROWS, D]), scale, top, code


@triton.jit
def round_rows(x, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """``x [ROWS, D]`` (float32) as a cache in format ``KV_QUANT`` gives each row back
    (:func:`baklava.kv_format.round_trip`); ``x`` itself for full precision."""
    if KV_QUANT == 0:
        return x
    if KV_QUANT != 2:
        q, scale = quantize_rows(x, KV_QUANT)
        return q * scale[:, None]
    q, scale, _top, _code = quantize_groups(hadamard_rows(x, ROWS, D), KV_GROUP, ROWS, D)
    return hadamard_rows(group_values(q, scale, KV_GROUP, ROWS, D), ROWS, D)


@triton.jit
def group_values(q, scale, KV_GROUP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """``q [ROWS, D]`` times each channel's group ``scale [ROWS, G]`` (still rotated)."""
    g = tl.reshape(q, [ROWS, D // KV_GROUP, KV_GROUP]) * scale[:, :, None]
    return tl.reshape(g, [ROWS, D])
