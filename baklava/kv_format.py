"""How a KV cache stores each token's key and value vectors: full precision, or quantized with scales.

Per-head budgets cut the tokens a head keeps; a quantized format cuts the bytes of each kept
token, and the two multiply (issue 23). Every format here quantizes **one token-head vector at a
time** (``[D]`` channels of one key or one value): its scales sit beside its slot and move with
it, so eviction, compaction and per-head capacities work on quantized slots exactly as on full
precision ones. (KIVI's per-channel key scales span many tokens of a block; a head that evicts
tokens from the middle of a block would leave those scales describing tokens it no longer holds.)

============  ======================  ===================================  =====================
format        payload per channel     scales per vector                    bytes, D = 128 / 64
============  ======================  ===================================  =====================
``auto``      the model's dtype       none                                 256 / 128 (bf16)
``fp8``       float8 e4m3             1 float16: ``absmax / 448``          130 / 66
``int8``      int8, symmetric         1 float16: ``absmax / 127``          130 / 66
``int4``      4 bits, two a byte,     a group of 32 channels each:         70 / 36
              after a Hadamard        ``absmax / 7`` in two levels (below)
              rotation
============  ======================  ===================================  =====================

int4's group scales come in two levels (:func:`group_scales`): one float16 ``top`` (the largest
group's ``absmax / 7``) and one byte ``c`` a group, the group's scale being
``top * (c + 1) / 256`` (the nearest such step to its own ``absmax / 7``). The bytes are packed two
to a word after ``top`` (the scales tensor holds int16 words: ``top``'s float16 bits, then the
codes), so the scales of a vector are ``1 + ceil(G / 2)`` float16 words
(``top`` alone where one group spans the vector):
6 bytes at D = 128 where four float16 scales took 8 (an int4 slot of a key and a value, 140
bytes instead of 144; issue 23's largest batch in 16 GiB counts them). ``top * (c + 1) / 256`` is
exact in float32 (an 11-bit mantissa times a 9-bit integer, then a power of two), so every reader
computes the same scale bit for bit. After the rotation a vector's groups are of a size, so the
codes sit near 255 and the steps they add are a fraction of a percent
(``benchmarks/kv/key_balance.py`` measures the formats' cost).

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

SCALE_DTYPE = torch.float16  # one scale a vector (fp8, int8)
WORD_DTYPE = torch.int16  # grouped scales' words: float16 top, then the codes two a word
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

    @property
    def storage_dtype(self) -> torch.dtype:
        """How a cache holds the payload: int8 as int8; fp8 as its bits, and int4's nibble pairs,
        as uint8 (PyTorch's CPU gather / scatter refuse float8)."""
        return torch.int8 if self.name == "int8" else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        """How the scales tensor holds its words: float16 scales, or (grouped) raw int16 words
        (the codes' bytes make no float16 worth computing with; int16 keeps them plain bits)."""
        return SCALE_DTYPE if self.group is None else WORD_DTYPE

    def groups(self, head_dim: int) -> int:
        """Channel groups of one vector, each with its own scale."""
        return 1 if self.group is None else head_dim // self.group

    def scales_per_vector(self, head_dim: int) -> int:
        """float16 words of one vector's scales: the scale, or (grouped) ``top`` and the codes
        two to a word (module docstring)."""
        if not self.quantized:
            return 0
        groups = self.groups(head_dim)
        return 1 if groups == 1 else 1 + (groups + 1) // 2

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
    groups = fmt.groups(x.shape[-1])
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def quantize(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(payload, scales [..., W])``, ``W = fmt.scales_per_vector(D)``, in
    ``fmt.scale_dtype``.

    Payload: int8 ``[..., D]`` (int8), float8_e4m3fn ``[..., D]`` (fp8), uint8 ``[..., D / 2]``
    (int4: channel ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one, each stored
    as ``q + 8``). Scales are rounded to their stored form first (float16; int4: two levels, the
    module docstring) and the payload computed with the rounded scale, so :func:`dequantize` is
    exact up to the payload's rounding.
    """
    if not fmt.quantized:
        raise ValueError(f"{fmt.name} is not a quantized format")
    fmt.check(x.shape[-1])
    g = _grouped(hadamard(x.float()) if fmt.rotate else x.float(), fmt)  # [..., G, D/G]
    # divided by a tensor on x's device: PyTorch's CUDA kernel divides by a Python scalar as a
    # multiply by its reciprocal, a bit off at times, where the CPU and the kernels divide
    want = g.abs().amax(-1) / torch.full((), fmt.qmax, device=g.device)  # [..., G]
    if fmt.group is None:
        scales = want.clamp(min=_TINY).to(SCALE_DTYPE)
    else:
        scales = _two_level(want)
    q = g / group_scales(scales, fmt, g.shape[-2])[..., None]
    if fmt.name == "fp8":
        payload = q.clamp(-fmt.qmax, fmt.qmax).to(torch.float8_e4m3fn)
    else:
        q = q.round().clamp(-fmt.qmax, fmt.qmax)
        if fmt.bits == 8:
            payload = q.to(torch.int8)
        else:
            u = (q + 8).to(torch.uint8).reshape(*x.shape[:-1], x.shape[-1])
            payload = u[..., 0::2] | (u[..., 1::2] << 4)
    return payload.reshape(*x.shape[:-1], -1), scales


CODE_STEPS = 256  # a group's scale is top * (code + 1) / CODE_STEPS, code a byte


def _two_level(want: torch.Tensor) -> torch.Tensor:
    """Group scales ``want [..., G]`` (float32) stored as ``[top, codes...]`` int16 words."""
    top = want.amax(-1, keepdim=True).clamp(min=_TINY).to(SCALE_DTYPE)  # [..., 1]
    if want.shape[-1] == 1:  # one group: its scale is top, no code
        return top.view(WORD_DTYPE)
    codes = (want * CODE_STEPS / top.float()).round().sub(1).clamp(0, CODE_STEPS - 1).to(torch.uint8)
    if codes.shape[-1] % 2:  # whole words: an odd group count pads a zero byte
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
    return torch.cat([top.view(WORD_DTYPE), codes.contiguous().view(WORD_DTYPE)], -1)


def group_scales(scales: torch.Tensor, fmt: KVFormat, groups: int) -> torch.Tensor:
    """The float32 scale of each of a vector's ``groups`` groups, ``[..., G]``, from its stored
    ``scales [..., W]`` (float16; grouped formats: int16 words, ``top * (code + 1) / 256``, exact
    in float32)."""
    if fmt.group is None:
        return scales.float()
    top = scales[..., :1].view(SCALE_DTYPE).float()
    if groups == 1:
        return top
    codes = scales[..., 1:].contiguous().view(torch.uint8)[..., :groups]
    return top * ((codes.float() + 1) * (1 / CODE_STEPS))


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
    grouped = _grouped(q, fmt)
    x = (grouped * group_scales(scales, fmt, grouped.shape[-2])[..., None]).reshape(q.shape)
    return (hadamard(x) if fmt.rotate else x).to(dtype)


def round_trip(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """``x`` as a cache in format ``fmt`` gives it back (``x`` itself for full precision)."""
    if not fmt.quantized:
        return x
    payload, scales = quantize(x, fmt)
    return dequantize(payload, scales, fmt, x.dtype)
