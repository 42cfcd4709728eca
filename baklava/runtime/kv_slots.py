"""What a packed layer's slots hold: the model's dtype, or a quantized payload with its scales.

A quantized format (:mod:`baklava.kv_format`) stores four tensors a layer instead of two::

    keys, values              [B, sum(cap), P]  payload: int8 [D] (int8), fp8 bits as uint8 [D] (fp8),
                                                 two nibbles a byte uint8 [D / 2] (int4)
    key_scales, value_scales  [B, sum(cap), G]  float16, G = 1 (int8, fp8) or D / 32 (int4)

so a layer's KV bytes are ``B x sum(cap) x 2 x (P x payload bytes + G x 2)``: what a memory
budget counts. A slot's scales move with it (eviction, compaction, rows of a slot pool): every
writer moves the four tensors alike, by name (:func:`slot_names`), and a token is quantized once,
when it enters (:func:`encode`); nothing re-quantizes a stored slot.

fp8 payload is kept as its bits (uint8): PyTorch's CPU gather / scatter refuse float8, and the
kernels take the bits as they are (:func:`payload`).

``BudgetedLayer.quantized_storage = False`` keeps the model's dtype and rounds each token as it
enters (quantize -> dequantize): the reference the stored payload is tested against, which reads
back the same values bit for bit.

``BudgetedLayer.smooth_keys`` (quantized formats; on by default; the exported ONNX graph smooths
its keys the same way before its ops, ``graph_builder._smoothed_keys``) stores each key minus its head's mean key ``key_mean [B, H_kv, D]``
(float32), fixed per row when the row's first tokens arrive (SageAttention's smoothing of K).
Attention is blind to it, ``q . (k - mu)`` moving every logit of a query by the same amount, and
the per-token scale no longer spends its range on what the keys share (Qwen2's k-projection bias:
int8 key error 3.2% -> 0.7% of the keys' spread; on an H200 at 32k, int8 at budget 0.3 keeps 99%
of bf16's score instead of 92%, BENCHMARKS.md). Keys read back are the smoothed ones.
"""

from __future__ import annotations

import torch

from baklava import kv_format as formats

FULL = ("keys", "values")
QUANTIZED = ("keys", "values", "key_scales", "value_scales")
META = ("positions", "scores", "fill", "valid_seen")
SMOOTH = ("key_mean",)  # per-row state of a layer that smooths its keys
_SCALES = {"keys": "key_scales", "values": "value_scales"}


def packs(layer) -> bool:
    """True where ``layer`` stores payload and scales (a quantized format, real storage)."""
    return layer.kv_format.quantized and layer.quantized_storage


def slot_names(layer) -> tuple[str, ...]:
    """The per-slot tensors of ``layer`` that move together when a slot moves."""
    return QUANTIZED if packs(layer) else FULL


def slot_pairs(layer) -> tuple[tuple[str, str], ...]:
    """:func:`slot_names` as (key, value) pairs: the payload, then (quantized) the scales."""
    names = slot_names(layer)
    return tuple(zip(names[0::2], names[1::2], strict=True))


def smooths(layer) -> bool:
    """True where ``layer`` stores its keys minus their head mean (module docstring)."""
    return layer.kv_format.quantized and layer.smooth_keys


def state_extra(layer) -> tuple[str, ...]:
    """Per-row state beyond the slots and :data:`META` (what pool rows and snapshots carry too)."""
    return SMOOTH if smooths(layer) else ()


def storage_dtype(fmt: formats.KVFormat) -> torch.dtype:
    return torch.int8 if fmt.name == "int8" else torch.uint8


def allocate(layer, batch: int, key_dim: int, value_dim: int, dtype, device) -> None:
    """Zeroed slot tensors for ``batch`` rows of ``layer`` (``dtype``: the model's)."""
    total = layer.total
    layer.key_mean = None
    if smooths(layer):
        layer.key_mean = torch.zeros(batch, layer.num_heads, key_dim, dtype=torch.float32, device=device)
    if not packs(layer):
        layer.keys = torch.zeros(batch, total, key_dim, dtype=dtype, device=device)
        layer.values = torch.zeros(batch, total, value_dim, dtype=dtype, device=device)
        layer.key_scales = layer.value_scales = None
        return
    fmt = layer.kv_format
    fmt.check(key_dim)
    fmt.check(value_dim)
    store = dict(dtype=storage_dtype(fmt), device=device)
    half = dict(dtype=formats.SCALE_DTYPE, device=device)
    width = lambda d: d * fmt.bits // 8  # noqa: E731
    layer.keys = torch.zeros(batch, total, width(key_dim), **store)
    layer.values = torch.zeros(batch, total, width(value_dim), **store)
    layer.key_scales = torch.zeros(batch, total, fmt.scales_per_vector(key_dim), **half)
    layer.value_scales = torch.zeros(batch, total, fmt.scales_per_vector(value_dim), **half)


def encode(layer, keys: torch.Tensor, values: torch.Tensor):
    """A step's new tokens ``[B, H_kv, q, D]`` as the cache will hold them.

    Returns ``(keys, values, slots)``: what attention reads for the new tokens (the values the
    stored slots give back) and ``{name: [B, H_kv, q, width]}`` to write into the slot tensors."""
    fmt = layer.kv_format
    if not fmt.quantized:
        return keys, values, {"keys": keys, "values": values}
    if layer.key_mean is not None:
        keys = _smoothed(layer, keys)
    if not layer.quantized_storage:  # the reference: round on entry, store the model's dtype
        keys, values = formats.round_trip(keys, fmt), formats.round_trip(values, fmt)
        return keys, values, {"keys": keys, "values": values}
    kp, ks = formats.quantize(keys, fmt)
    vp, vs = formats.quantize(values, fmt)
    slots = {"keys": _bits(kp), "values": _bits(vp), "key_scales": ks, "value_scales": vs}
    return formats.dequantize(kp, ks, fmt, keys.dtype), formats.dequantize(vp, vs, fmt, values.dtype), slots


def _smoothed(layer, keys: torch.Tensor) -> torch.Tensor:
    """``keys [B, H_kv, q, D]`` minus their head's mean key; a row whose first real tokens these
    are (``valid_seen == 0``) takes their mean as its own first (on the device: no host sync, a
    CUDA graph can hold it)."""
    first = (layer.valid_seen == 0)[:, None, None]  # [B, 1, 1]
    wide = keys.float()
    torch.where(first, wide.mean(2), layer.key_mean, out=layer.key_mean)  # in place: one launch fewer
    return (wide - layer.key_mean[:, :, None]).to(keys.dtype)


def read(layer, name: str, *index) -> torch.Tensor:
    """``getattr(layer, name)[index]`` (``name``: keys or values) in the model's dtype."""
    raw = getattr(layer, name)[index]
    if not packs(layer):
        return raw
    scales = getattr(layer, _SCALES[name])[index]
    return formats.dequantize(_typed(raw, layer.kv_format), scales, layer.kv_format, layer.dtype)


def kernel_operands(layer) -> tuple[torch.Tensor, torch.Tensor, formats.KVFormat | None]:
    """``(keys, values, kv_format)`` as the attention kernels take them: the payload (fp8 bits
    as float8_e4m3fn) and the format when the layer stores one, else the tensors and None; the
    scales are ``layer.key_scales`` / ``layer.value_scales``."""
    quantized = packs(layer)
    return payload(layer, "keys"), payload(layer, "values"), layer.kv_format if quantized else None


def payload(layer, name: str) -> torch.Tensor:
    """The slot tensor ``name`` as the kernels read it (fp8 bits as float8_e4m3fn)."""
    raw = getattr(layer, name)
    return _typed(raw, layer.kv_format) if packs(layer) and name in _SCALES else raw


def _bits(payload: torch.Tensor) -> torch.Tensor:
    return payload.view(torch.uint8) if payload.dtype == torch.float8_e4m3fn else payload


def _typed(raw: torch.Tensor, fmt: formats.KVFormat) -> torch.Tensor:
    return raw.view(torch.float8_e4m3fn) if fmt.name == "fp8" else raw
