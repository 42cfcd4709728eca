"""The ``kv_dtype`` attribute in ONNX: new keys and values rounded as a quantized cache returns them.

Both ``baklava`` ops take ``kv_dtype`` (``auto`` = full precision, ``fp8``, ``int8``, ``int4``;
:mod:`baklava.kv_format`). With a quantized format each op rounds the step's ``key`` and ``value``
exactly as :func:`baklava.kv_format.round_trip` does (per token-head vector: float16 scale
``absmax / qmax``; or per 32-channel group for int4 after a Hadamard rotation, its scale in two
levels; then round or cast to float8, then back), before
attending or storing: the same standard ops in float32, so ONNX Runtime matches the PyTorch
reference store value for value. The graph's cache tensors stay float32 (the reference store;
the PyTorch runtime stores payload and scales, which read back the same values): what ONNX
Runtime runs is the format's accuracy, not its memory.
"""

from __future__ import annotations

from onnx import TensorProto

from baklava import kv_format
from baklava.exporter.ops.body import FLOAT, Body


def hadamard(b: Body, x: str, head_dim: int) -> str:
    """:func:`baklava.kv_format.hadamard` of ``x [B, H, S, D]``: the same butterflies in the same
    order (float32 adds, then one multiply), so ONNX Runtime and PyTorch agree bit for bit."""
    shape = b.op("Shape", x)
    lead = b.op("Slice", shape, b.ints(0), b.ints(3), b.ints(0))
    y, h = x, 1
    while h < head_dim:
        y = b.op("Reshape", y, b.op("Concat", lead, b.ints(head_dim // (2 * h), 2, h), axis=0))
        lo = b.op("Squeeze", b.op("Slice", y, b.ints(0), b.ints(1), b.ints(-2)), b.ints(-2))
        hi = b.op("Squeeze", b.op("Slice", y, b.ints(1), b.ints(2), b.ints(-2)), b.ints(-2))
        pair = (b.op("Add", lo, hi), b.op("Sub", lo, hi))
        y = b.op("Concat", *(b.op("Unsqueeze", t, b.ints(-2)) for t in pair), axis=-2)
        h *= 2
    return b.op("Mul", b.op("Reshape", y, shape), b.const(head_dim**-0.5, dtype="float32"))


def _half(b: Body, x: str) -> str:
    """``x`` rounded to float16 and back (a stored scale)."""
    return b.op("Cast", b.op("Cast", x, to=TensorProto.FLOAT16), to=FLOAT)


def round_trip(b: Body, x: str, kv_dtype: str, head_dim: int | None = None) -> str:
    """``x [B, H, S, D]`` (float) rounded through ``kv_dtype``; ``x`` itself for full precision.
    A rotating format (int4) needs ``head_dim``: its butterflies are unrolled here."""
    fmt = kv_format.parse(kv_dtype)
    if not fmt.quantized:
        return x
    if fmt.rotate:
        if head_dim is None:
            raise ValueError(f"kv_dtype {fmt.name} rotates each vector: the op body needs the head dimension")
        fmt.check(head_dim)
        x = hadamard(b, x, head_dim)
    shape = b.op("Shape", x)
    groups = x
    if fmt.group is not None:  # [B, H, S, D / group, group]
        lead = b.op("Slice", shape, b.ints(0), b.ints(3), b.ints(0))
        groups = b.op("Reshape", x, b.op("Concat", lead, b.ints(-1, fmt.group), axis=0))
    absmax = b.op("ReduceMax", b.op("Abs", groups), b.ints(-1), keepdims=1)
    want = b.op("Div", absmax, b.const(fmt.qmax, dtype="float32"))
    tiny = b.const(2.0**-14, dtype="float32")
    if fmt.group is None:
        scale = _half(b, b.op("Max", want, tiny))  # stored as float16
    else:  # two levels (kv_format._two_level): float16 top, a byte code a group
        top = _half(b, b.op("Max", b.op("ReduceMax", want, b.ints(-2), keepdims=1), tiny))
        steps = b.const(float(kv_format.CODE_STEPS), dtype="float32")
        code = b.op(
            "Sub", b.op("Round", b.op("Div", b.op("Mul", want, steps), top)), b.const(1.0, dtype="float32")
        )
        code = b.op(
            "Clip", code, b.const(0.0, dtype="float32"), b.const(kv_format.CODE_STEPS - 1.0, dtype="float32")
        )
        ratio = b.op(
            "Mul",
            b.op("Add", code, b.const(1.0, dtype="float32")),
            b.const(1 / kv_format.CODE_STEPS, dtype="float32"),
        )
        scale = b.op("Mul", top, ratio)  # exact in float32, as every reader computes it
    q = b.op("Div", groups, scale)
    lo, hi = b.const(-fmt.qmax, dtype="float32"), b.const(fmt.qmax, dtype="float32")
    if fmt.name == "fp8":
        q = b.op("Cast", b.op("Cast", b.op("Clip", q, lo, hi), to=TensorProto.FLOAT8E4M3FN), to=FLOAT)
    else:
        q = b.op("Clip", b.op("Round", q), lo, hi)
    out = b.op("Mul", q, scale)
    out = out if fmt.group is None else b.op("Reshape", out, shape)
    return hadamard(b, out, head_dim) if fmt.rotate else out
