"""A prefill chunk on the GPU: attention, SnapKV masses and commit, never waiting for the device.

:meth:`BudgetedLayer.attend <baklava.runtime.packed_cache.BudgetedLayer.attend>` sends every
chunk here where the Triton kernels run (a padded one with its real tokens, ``valid``). Nothing
the host decides reads a device tensor: the fill pointers stay on the GPU (the kernels read them per row), and whether every head has room
for the chunk follows from ``seen`` (a head never holds more tokens than its layer has seen), so
the CPU queues every layer's kernels ahead of the GPU instead of stopping at each layer (the
per-head path read the fills back every layer: on an H200, 2048-token chunks of a 32k prompt left
the GPU idle a fifth of the prefill).

::

    first chunk, no padding  flash SDPA, causal, every head     SnapKV masses from flash's
                                                                log-sum-exp (the mass kernel)
    later chunks             kernels/prefill_attention.py       stored slots read in place; masses
                                                                of stored slots added to scores
    padded chunks (any)      the same kernels with ``valid``    padded tokens no key, no mass
    commit                   room in every head, no padding: prefill_attention.append (one
                             index_copy per tensor); else kernels/prefill_select.py (priorities,
                             sort, gather; padded tokens never kept)

:func:`commit_masked` is the same commit for chunks whose attention and masses come from the
per-head path (``BudgetedLayer.prefill_kernel = False``).

The per-head SDPA path (:func:`baklava.runtime.prefill_attention.unpadded_chunk`; with padding,
``attend`` 's biased loop) is the reference.
"""

from __future__ import annotations

import torch

from baklava.kernels.prefill_attention import observation_masses, prefill_attention
from baklava.kernels.prefill_select import packed_prefill_select
from baklava.runtime import kv_slots
from baklava.runtime.prefill_attention import (
    add_head_masses,
    append,
    causal_self_attention_lse,
    observation_mass,
)
from baklava.runtime.selection import snapkv_pool


def chunk(
    layer, query, k_new, v_new, slots: dict, scale: float, obs: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attend ``query [B, H_q, S, D]`` over ``layer`` 's stored slots and the chunk (``k_new``,
    ``v_new [B, H_kv, S, D]``), then store the chunk (``slots``: each slot tensor's rows
    ``[B, H_kv, S, width]``), scored by its last ``obs`` queries (0: no scores, the ring policy).
    ``valid [B, S]``: the chunk's real tokens when it has padding (the kernels mask the rest, the
    commit skips them). Returns the attention output ``[B, S, H_q, D]``, contiguous."""
    keys, values, kv_format = kv_slots.kernel_operands(layer)
    quantized = dict(kv_format=kv_format, key_scales=layer.key_scales)
    offsets = layer.device_offsets
    if layer.seen == 0 and valid is None:  # nothing stored: one flash call for every head
        out, lse = causal_self_attention_lse(query, k_new, v_new, scale)
        out = out.transpose(1, 2).contiguous()
        new_mass = None
        if obs and lse is not None:  # the masses from flash's log-sum-exp: one launch (fill is 0)
            new_mass = observation_masses(
                query, keys, k_new, layer.fill, offsets, lse, layer.scores, 0, obs, scale, **quantized
            )
        elif obs:
            new_mass = observation_mass(query, k_new, 0, obs, scale)
    else:
        out, lse = prefill_attention(
            query, keys, values, k_new, v_new, layer.fill, offsets, scale,
            value_scales=layer.value_scales, valid=valid, **quantized,
        )  # fmt: skip
        new_mass = None
        if obs:
            longest = max(layer.capacities)
            new_mass = observation_masses(
                query, keys, k_new, layer.fill, offsets, lse, layer.scores, longest, obs, scale,
                valid=valid, **quantized,
            )  # fmt: skip
    commit(layer, slots, new_mass, valid)
    return out


def commit(layer, slots: dict, new_mass: torch.Tensor | None, valid: torch.Tensor | None = None) -> None:
    """Store a chunk whose stored slots' masses are already in ``layer.scores``; ``new_mass
    [B, H_kv, S]`` the new tokens' (pooled here; padded ones hold 0), None for zero scores;
    ``valid [B, S]`` its real tokens when it has padding (None: all)."""
    batch, heads, s = next(iter(slots.values())).shape[:3]
    if new_mass is None:
        new_scores = torch.zeros(batch, heads, s, device=layer.device)
    else:
        new_scores = snapkv_pool(new_mass, layer.eviction.pool_kernel)
    if valid is None and layer.seen + s <= min(layer.capacities):  # fill <= seen: every head has room
        append(layer, slots, new_scores)
    else:
        real = torch.ones(batch, s, dtype=torch.bool, device=layer.device) if valid is None else valid
        select(layer, slots, real, new_scores)
    layer.valid_seen += s if valid is None else valid.sum(1)
    layer.seen += s


def commit_masked(layer, slots: dict, valid: torch.Tensor, masses) -> None:
    """Every head's ``BudgetedLayer._commit_head`` at once for a chunk with padding (``valid
    [B, S]``; ``masses``: each head's ``(n, mass [B, n + S] or None)`` from the per-head path).
    The caller advances ``seen``."""
    shape = next(iter(slots.values())).shape[:3]
    select(layer, slots, valid, add_head_masses(layer, masses, shape, valid))


def select(layer, slots: dict, valid: torch.Tensor, new_scores: torch.Tensor) -> None:
    """Keep each head's highest-priority candidates (its live slots, then the chunk's valid
    tokens scored ``new_scores [B, H_kv, S]``), in arrival order: ``kernels/prefill_select.py``."""
    ev = layer.eviction
    new_positions = layer.valid_seen[:, None] + valid.cumsum(1) - 1
    seen_after = layer.valid_seen + valid.sum(1)
    pairs = kv_slots.slot_pairs(layer)  # (keys, values), then (key_scales, value_scales)
    packed_prefill_select(  # in place: the layer's slots, positions, scores and fill
        [(getattr(layer, k), getattr(layer, v), slots[k].contiguous(), slots[v].contiguous()) for k, v in pairs],
        layer.positions, layer.scores, layer.fill, new_positions, new_scores, valid, seen_after,
        layer.capacities, layer.device_offsets, sink=ev.sink, window=ev.window, policy=ev.policy,
        device_capacities=layer.device_capacities,
    )  # fmt: skip
