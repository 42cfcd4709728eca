"""Cutting a filled layer to smaller capacities: one full prefill serves many budgets.

Applied to a layer that never evicted (every capacity >= the prompt), :func:`compressed` gives,
slot for slot, what a prefill straight into the smaller capacities would have kept: the stored
scores are the pooled prefill scores and the priority is the one ``BudgetedLayer.attend`` uses.
The quality benchmark prefills each prompt once and cuts it to every budget it measures
(``bench/quality/runner.py``); a context compressed before its question is cut the same way
(``context_compression.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import kv_slots
from baklava.runtime.selection import chronological_keep, keep_priority


def compressed(layer, capacities: Sequence[int], eviction: EvictionConfig | None = None):
    """A new layer of ``layer``'s class holding its tokens cut to ``capacities`` (``layer`` unchanged).

    ``eviction`` (default: the layer's) sets sink, window and policy of the new layer; the scores
    themselves were computed by the layer's ``obs_window`` and ``pool_kernel``. The new layer stores
    tokens as ``layer`` does (format, storage options, a smoothing layer's mean key and key scale).
    """
    out = type(layer)(capacities, eviction or layer.eviction, layer.kv_format)
    out.take_storage_options(layer)
    if not layer.is_initialized:
        return out
    if len(out.capacities) != layer.num_heads:
        raise ValueError(f"{len(out.capacities)} capacities for a layer of {layer.num_heads} KV heads")
    if layer._pending is not None:
        raise RuntimeError("cannot compress a layer in the middle of a step")
    like = dict(dtype=layer.dtype, device=layer.device)
    out.lazy_initialization(
        torch.empty(layer.batch_size, layer.num_heads, 0, layer.head_dim, **like),
        torch.empty(layer.batch_size, layer.num_heads, 0, layer.value_dim, **like),
    )
    out.seen, out.valid_seen = layer.seen, layer.valid_seen.clone()
    for name in kv_slots.state_extra(layer):  # a smoothing layer's mean key and key scale
        getattr(out, name).copy_(getattr(layer, name))
    ev = out.eviction
    for h, (off, new_off, cap) in enumerate(zip(layer.offsets, out.offsets, out.capacities, strict=True)):
        fill = layer.fill[:, h]
        n = int(fill.max())
        live = torch.arange(n, device=layer.device)[None, :] < fill[:, None]  # [B, n]
        pos, score = layer.positions[:, off : off + n], layer.scores[:, off : off + n]
        priority = keep_priority(
            pos, score, live, layer.valid_seen, sink=ev.sink, window=ev.window, policy=ev.policy
        )
        keep = min(cap, n)
        idx = chronological_keep(priority, live, keep)  # [B, keep]
        for name in layer.slot_names:  # a slot's payload and scales move together
            src = getattr(layer, name)[:, off : off + n]
            getattr(out, name)[:, new_off : new_off + keep] = src.gather(
                1, idx[..., None].expand(-1, -1, src.shape[-1])
            )
        kept_live = live.gather(1, idx)
        out.positions[:, new_off : new_off + keep] = pos.gather(1, idx).masked_fill(~kept_live, -1)
        out.scores[:, new_off : new_off + keep] = score.gather(1, idx).masked_fill(~kept_live, 0)
        out.fill[:, h] = torch.clamp(fill, max=cap)
    return out
