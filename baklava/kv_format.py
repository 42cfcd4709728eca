"""How a KV cache stores each token's key and value vectors: full precision, or quantized with scales.

Per-head budgets cut the tokens a head keeps; a quantized format cuts the bytes of each kept
token, and the two multiply (issue 23). Every format here quantizes **one token-head vector at a
time** (``[D]`` channels of one key or one value): its scales sit beside its slot and move with
it, so eviction, compaction and per-head capacities work on quantized slots exactly as on full
precision ones. (KIVI's per-channel key scales span many tokens of a block; a head that evicts
tokens from the middle of a block would leave those scales describing tokens it no longer holds.)

============  ======================  ===================================  =====================
format        payload per channel     scales per vector (float16)          bytes, D = 128 / 64
============  ======================  ===================================  =====================
``auto``      the model's dtype       none                                 256 / 128 (bf16)
``fp8``       float8 e4m3             1: ``absmax / 448``                  130 / 66
``int8``      int8, symmetric         1: ``absmax / 127``                  130 / 66
``int4``      4 bits, two a byte,     ``D / 32``: ``absmax / 7`` a group   72 / 36
              after a Hadamard rotation
============  ======================  ===================================  =====================

:func:`quantize` / :func:`dequantize` are the plain PyTorch reference every kernel is tested
against. The runtime's caches store the payload and scales (:mod:`baklava.runtime.kv_slots`);
:func:`round_trip` (quantize then dequantize) is what the reference store applies to a token when
it enters a cache that keeps the model's dtype (``BudgetedLayer.quantized_storage = False``, and
the ONNX ops): the same values a quantized slot gives back, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baklava.errors import BaklavaError

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2
_TINY = 2.0**-14  # smallest normal float16: an all-zero vector keeps a usable scale


@dataclass(frozen=True)
class KVFormat:
    """One storage format of the cache (see the module docstring's table)."""

    name: str
    bits: int | None  # payload bits per channel; None: the model's dtype, no scales
    qmax: float = 0.0  # largest quantized magnitude (the scale maps absmax onto it)
    group: int | None = None  # channels sharing a scale; None: the whole vector
    rotate: bool = False  # quantize each vector after a Hadamard rotation (:func:`hadamard`)
    full_bytes: int | None = None  # a full-precision spelling's own size; None: the model's dtype

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def scales_per_vector(self, head_dim: int) -> int:
        if not self.quantized:
            return 0
        return 1 if self.group is None else head_dim // self.group

    def vector_bytes(self, head_dim: int, model_dtype_bytes: int = 2) -> int:
        """Bytes of one token-head key (or value): payload plus its scales."""
        if not self.quantized:
            return head_dim * (self.full_bytes or model_dtype_bytes)
        return head_dim * self.bits // 8 + self.scales_per_vector(head_dim) * SCALE_BYTES

    def element_bytes(self, head_dim: int, model_dtype_bytes: int = 2) -> float:
        """:meth:`vector_bytes` per channel (what memory budgets divide by)."""
        return self.vector_bytes(head_dim, model_dtype_bytes) / head_dim

    def check(self, head_dim: int) -> None:
        if self.rotate and head_dim & (head_dim - 1):
            raise BaklavaError(f"--kv-dtype {self.name} needs a power-of-two head dimension, got {head_dim}")
        if self.group is not None and head_dim % self.group:
            raise BaklavaError(
                f"--kv-dtype {self.name} needs a head dimension divisible by {self.group}, got {head_dim}"
            )
        if self.bits == 4 and head_dim % 2:
            raise BaklavaError(f"--kv-dtype int4 needs an even head dimension, got {head_dim}")


FORMATS = {
    "auto": KVFormat("auto", None),
    "fp8": KVFormat("fp8", 8, 448.0),
    "int8": KVFormat("int8", 8, 127.0),
    "int4": KVFormat("int4", 4, 7.0, group=32, rotate=True),
}
# full-precision spellings the command line took before quantized storage existed (budgets count
# their size; the runtime stores the model's dtype)
FORMATS |= {
    name: KVFormat(name, None, full_bytes=size)
    for name, size in {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}.items()
}
NAMES = list(FORMATS)


def parse(name: str | KVFormat | None) -> KVFormat:
    """The format called ``name`` (``None``: ``auto``); a one-line error for an unknown one."""
    if isinstance(name, KVFormat):
        return name
    key = "auto" if name is None else str(name).lower()
    if key not in FORMATS:
        raise BaklavaError(f"unknown KV dtype {name!r}; known: {', '.join(NAMES)}")
    return FORMATS[key]


def element_bytes(name, head_dim: int, model_dtype_bytes: int) -> float:
    """Bytes a channel of the cache costs at format ``name`` (full-precision spellings: their
    own size, ``auto``: the model's), after checking ``head_dim`` suits it."""
    fmt = parse(name)
    fmt.check(head_dim)
    return fmt.element_bytes(head_dim, model_dtype_bytes)


# ---------------------------------------------------------------------------- reference
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` (float32, ``D`` a power of two) times the orthonormal Hadamard matrix, by
    butterflies (``D log D`` adds in a fixed order, so ONNX Runtime's copy gives the same bits).

    The matrix is its own inverse and keeps dot products, so a key and a query rotated alike
    attend as before, and a rotated value comes back with one more rotation. A vector's few
    outlier channels are spread over all of them first, so its per-token scale fits the rest
    (QuaRot's remedy for 4-bit caches; BENCHMARKS.md measures int4 with and without it)."""
    d = x.shape[-1]
    y, h = x, 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(x.shape) * d**-0.5  # a Python scalar: no host-to-device copy in a CUDA graph


def _grouped(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """``x [..., D]`` viewed as ``[..., G, D / G]`` (one group a scale)."""
    groups = fmt.scales_per_vector(x.shape[-1])
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(payload, scales [..., G] float16)``.

    Payload: int8 ``[..., D]`` (int8), float8_e4m3fn ``[..., D]`` (fp8), uint8 ``[..., D / 2]``
    (int4: channel ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one, each stored
    as ``q + 8``). Scales are rounded to float16 first and the payload computed with the rounded
    scale, so :func:`dequantize` is exact up to the payload's rounding.
    """
    if not fmt.quantized:
        raise ValueError(f"{fmt.name} is not a quantized format")
    fmt.check(x.shape[-1])
    g = _grouped(hadamard(x.float()) if fmt.rotate else x.float(), fmt)  # [..., G, D/G]
    scale = (g.abs().amax(-1) / fmt.qmax).clamp(min=_TINY).to(SCALE_DTYPE)  # [..., G]
    q = g / scale.float()[..., None]
    if fmt.name == "fp8":
        payload = q.clamp(-fmt.qmax, fmt.qmax).to(torch.float8_e4m3fn)
    else:
        q = q.round().clamp(-fmt.qmax, fmt.qmax)
        if fmt.bits == 8:
            payload = q.to(torch.int8)
        else:
            u = (q + 8).to(torch.uint8).reshape(*x.shape[:-1], x.shape[-1])
            payload = u[..., 0::2] | (u[..., 1::2] << 4)
    return payload.reshape(*x.shape[:-1], -1), scale


def dequantize(
    payload: torch.Tensor, scales: torch.Tensor, fmt: KVFormat, dtype=torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[..., D]`` in ``dtype`` (computed in float32)."""
    if fmt.bits == 4:
        low = (payload & 0xF).to(torch.int16) - 8
        high = (payload >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], -1).reshape(*payload.shape[:-1], payload.shape[-1] * 2).float()
    else:
        q = payload.float()
    x = (_grouped(q, fmt) * scales.float()[..., None]).reshape(q.shape)
    return (hadamard(x) if fmt.rotate else x).to(dtype)


def round_trip(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """``x`` as a cache in format ``fmt`` gives it back (``x`` itself for full precision)."""
    if not fmt.quantized:
        return x
    payload, scales = quantize(x, fmt)
    return dequantize(payload, scales, fmt, x.dtype)
