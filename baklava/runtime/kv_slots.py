"""What a packed layer's slots hold: the model's dtype, or a quantized payload with its scales.

A quantized format (:mod:`baklava.kv_format`) stores four tensors a layer instead of two::

    keys, values              [B, sum(cap), P]  payload: int8 [D] (int8), fp8 bits as uint8 [D] (fp8),
                                                 two nibbles a byte uint8 [D / 2] (int4)
    key_scales, value_scales  [B, sum(cap), W]  float16, W = 1 (int8, fp8); or int16 words,
                                                W = 1 + ceil(D / 64) (int4: top's float16 bits,
                                                then a byte a group, two a word)

so a layer's KV bytes are ``B x sum(cap) x 2 x (P x payload bytes + W x 2)``: what a memory
budget counts. A slot's scales move with it (eviction, compaction, rows of a slot pool): every
writer moves the four tensors alike, by name (:func:`slot_names`), and a token is quantized once,
when it enters (:func:`encode`); nothing re-quantizes a stored slot.

fp8 payload is kept as its bits (uint8): PyTorch's CPU gather / scatter refuse float8, and the
kernels take the bits as they are (:func:`payload`).

``BudgetedLayer.quantized_storage = False`` keeps the model's dtype and rounds each token as it
enters (quantize -> dequantize): the reference the stored payload is tested against, which reads
back the same values bit for bit.

``BudgetedLayer.smooth_keys`` (quantized formats; on by default; the exported ONNX graph smooths
its keys the same way before its ops, ``graph_builder._smoothed``) stores each key as
``(k - mu) * s`` and hands attention the query as ``q / s``, with two per-row states fixed when a
row's first tokens arrive (``valid_seen == 0``; padding takes no part, so a row's state is the
same alone as in a padded batch) and kept for its life:

* ``key_mean [B, H_kv, D]`` (float32), the head's mean key ``mu`` (SageAttention's smoothing of K).
  Attention is blind to it: ``q . (k - mu)`` moves every logit of a query by the same amount,
  and the per-token scale no longer spends its range on what the keys share (Qwen2's
  k-projection bias).
* ``key_scale [B, H_kv, D]`` (float32), a per-channel balance ``s``: ``(q / s) . (k' s)`` is
  ``q . k'``, so attention is blind to it too, but the rounding error a quantized key picks up in
  channel ``c`` reaches the logit divided by ``s_c``. Rounding spreads its error evenly over the
  channels (per-vector scales, and int4's rotation), so the logit error is smallest with
  ``s_c ~ sqrt(rms(q_c) / rms(k_c - mu_c))`` (Cauchy-Schwarz on ``sum_c s_c^2 var(k_c) x
  sum_c q_c^2 / s_c^2``), normalised to rms 1 and kept within [1/64, 64]: channels the queries
  weigh heavily keep finer steps.
  ``rms(q_c)`` is over the first step's queries of the head's group. A row whose first step is
  one token has no spread to measure and keeps ``s = 1``; so does every row of a layer whose
  ``balance_keys`` is off (an ablation; exported graphs always balance).

Measured on the CPU (full cache, every K/V rounded, Qwen2.5-Coder-0.5B at 2k tokens, KL of the
next-token distribution to float32's: ``benchmarks/kv/key_balance.py``): int4 0.186 centred,
0.036 centred and balanced; int8 0.0026 and 0.0005. Keys read back are the smoothed ones, and
every read of them pairs with the scaled query."""

from __future__ import annotations

import torch

from baklava import kv_format as formats

FULL = ("keys", "values")
QUANTIZED = ("keys", "values", "key_scales", "value_scales")
META = ("positions", "scores", "fill", "valid_seen")
SMOOTH = ("key_mean", "key_scale")  # per-row state of a layer that smooths its keys
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


def allocate(layer, batch: int, key_dim: int, value_dim: int, dtype, device) -> None:
    """Zeroed slot tensors for ``batch`` rows of ``layer`` (``dtype``: the model's)."""
    total = layer.total
    layer.key_mean = layer.key_scale = None
    if smooths(layer):
        wide = dict(dtype=torch.float32, device=device)
        layer.key_mean = torch.zeros(batch, layer.num_heads, key_dim, **wide)
        layer.key_scale = torch.ones(batch, layer.num_heads, key_dim, **wide)
    if not packs(layer):
        layer.keys = torch.zeros(batch, total, key_dim, dtype=dtype, device=device)
        layer.values = torch.zeros(batch, total, value_dim, dtype=dtype, device=device)
        layer.key_scales = layer.value_scales = None
        return
    fmt = layer.kv_format
    fmt.check(key_dim)
    fmt.check(value_dim)
    store = dict(dtype=fmt.storage_dtype, device=device)
    half = dict(dtype=fmt.scale_dtype, device=device)
    width = lambda d: d * fmt.bits // 8  # noqa: E731
    layer.keys = torch.zeros(batch, total, width(key_dim), **store)
    layer.values = torch.zeros(batch, total, width(value_dim), **store)
    layer.key_scales = torch.zeros(batch, total, fmt.scales_per_vector(key_dim), **half)
    layer.value_scales = torch.zeros(batch, total, fmt.scales_per_vector(value_dim), **half)


def encode(
    layer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None = None
):
    """A step's queries ``[B, H_q, q, D]`` and new tokens ``[B, H_kv, q, D]`` as attention pairs
    them with the cache; ``real [B, q]`` (None: all) marks the tokens that are not padding.

    Returns ``(query, keys, values, slots)``: the query as attention must use it (scaled where the
    layer smooths its keys), what attention reads for the new tokens (the values the stored slots
    give back) and ``{name: [B, H_kv, q, width]}`` to write into the slot tensors. Where the
    layer's kernels run and it stores int8 / fp8, one Triton launch does what follows the
    smoothing state's update (:mod:`baklava.kernels.kv_encode`, the same bits)."""
    fmt = layer.kv_format
    if not fmt.quantized:
        return query, keys, values, {"keys": keys, "values": values}
    if layer.key_mean is not None:
        _fix_smoothing(layer, query, keys, real)
    if layer.quantized_storage and _fused(layer, keys):
        from baklava.kernels import kv_encode

        query, slots, keys, values = kv_encode.encode(
            query, keys, values, fmt, layer.key_mean, layer.key_scale
        )
        return query, keys, values, slots
    if layer.key_mean is not None:
        query, keys = _smoothed(layer, query, keys)
    if not layer.quantized_storage:  # the reference: round on entry, store the model's dtype
        keys, values = formats.round_trip(keys, fmt), formats.round_trip(values, fmt)
        return query, keys, values, {"keys": keys, "values": values}
    kp, ks = formats.quantize(keys, fmt)
    vp, vs = formats.quantize(values, fmt)
    slots = {"keys": _bits(kp), "values": _bits(vp), "key_scales": ks, "value_scales": vs}
    return (
        query,
        formats.dequantize(kp, ks, fmt, keys.dtype),
        formats.dequantize(vp, vs, fmt, values.dtype),
        slots,
    )


def _fused(layer, keys: torch.Tensor) -> bool:
    """Whether :func:`encode` runs the one-launch kernel: a layer on its kernels, a format it
    takes (decode steps and prompt chunks alike: int4 chunks too since the reference divides by a
    device tensor, ``kv_format.quantize``; bit for bit on an H100, BENCHMARKS.md)."""
    from baklava.kernels import kv_encode

    return layer._use_kernels() and kv_encode.takes(layer.kv_format, keys.shape[-1])


def _fix_smoothing(layer, query: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None) -> None:
    """A row whose first real tokens these are (``valid_seen == 0``) takes ``mu`` and ``s`` from
    them, padding left out (module docstring; on the device: no host sync, a CUDA graph can hold
    it); every other row keeps its own."""
    first = (layer.valid_seen == 0)[:, None, None]  # [B, 1, 1]
    wide = None
    if keys.shape[2] == 1 and real is None:  # a decode step: one token is its own mean (no copy)
        mean = keys[:, :, 0]
    else:
        wide = keys.float()
        mean = _mean(wide, real)
    torch.where(first, mean, layer.key_mean, out=layer.key_mean)  # in place: one launch fewer
    if keys.shape[2] > 1 and layer.balance_keys:
        centred = wide - layer.key_mean[:, :, None]
        torch.where(first, channel_balance(query, centred, real), layer.key_scale, out=layer.key_scale)
    else:  # one token has no spread: such a row keeps s = 1 (as every row does without the balance)
        layer.key_scale.masked_fill_(first, 1.0)


def _smoothed(layer, query: torch.Tensor, keys: torch.Tensor):
    """``(query / s, (keys - mu) * s)`` with the layer's smoothing state (:func:`_fix_smoothing`)."""
    centred = keys.float() - layer.key_mean[:, :, None]
    batch, q_heads, q_len, dim = query.shape
    heads = layer.num_heads
    scale = layer.key_scale[:, :, None]  # [B, H_kv, 1, D]
    grouped = query.float().view(batch, heads, q_heads // heads, q_len, dim) / scale[:, :, None]
    return grouped.view(query.shape).to(query.dtype), (centred * scale).to(keys.dtype)


def channel_balance(
    query: torch.Tensor, centred: torch.Tensor, real: torch.Tensor | None = None
) -> torch.Tensor:
    """``s [B, H_kv, D]``: ``sqrt(rms(q_c) / rms(k_c))`` per channel, normalised to rms 1, from
    ``query [B, H_q, q, D]`` (a head's whole query group) and ``centred [B, H_kv, q, D]`` keys, over
    the ``real [B, q]`` tokens (None: all)."""
    batch, heads, q_len, dim = centred.shape
    grouped = query.float().view(batch, heads, -1, q_len, dim).square().mean(2)  # [B, H_kv, q, D]
    reach = _mean(grouped, real).sqrt()  # [B, H_kv, D]
    spread = _mean(centred.square(), real).sqrt()
    s = (reach.clamp(min=BALANCE_FLOOR) / spread.clamp(min=BALANCE_FLOOR)).sqrt()
    return (s * s.square().mean(-1, keepdim=True).rsqrt()).clamp(1 / BALANCE_RANGE, BALANCE_RANGE)


def _mean(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """``x [B, H, q, D]`` averaged over the ``real [B, q]`` tokens (None: all; a row without any
    gives zeros)."""
    if real is None:
        return x.mean(2)
    weight = real.to(x.dtype)[:, None, :, None]
    return (x * weight).sum(2) / weight.sum(2).clamp(min=1)


BALANCE_FLOOR = 1e-6  # floors both spreads: a dead channel divides by no zero
BALANCE_RANGE = 64.0  # bounds s (Qwen2.5-Coder's keys need 0.02-5.3): a scaled query stays far inside fp16


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
