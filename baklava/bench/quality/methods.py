"""The compression methods the quality benchmark compares, all as capacities of one budgeted cache.

=========  ==================================================  ==========
method     capacities ``[L, H_kv]``                            eviction
=========  ==================================================  ==========
full       the whole sequence (nothing is evicted)             -
uniform    the same for every head                             SnapKV/H2O
streaming  the same for every head (StreamingLLM)              sink + recent
layer      per layer from the layer proxy (SqueezeAttention)   SnapKV/H2O
pyramid    more in lower layers (PyramidKV)                    SnapKV/H2O
adakv      per head from *this* prefill's scores (AdaKV)       SnapKV/H2O
baklava    per head from the offline profile                   SnapKV/H2O
=========  ==================================================  ==========

``adakv`` splits every layer's (uniform) share among its heads by where the top-scoring tokens of
this prefill fall, over the batch's rows at once, because a cache has one capacity per head; a
floor of ``floor_frac`` of the even share keeps every head alive (AdaKV's safeguard).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from baklava.eviction import EvictionConfig
from baklava.profiles.allocators import make_allocator
from baklava.profiles.allocators.base import water_fill
from baklava.profiles.head_scores import HeadScores
from baklava.runtime.packed_cache import BudgetedCache, BudgetedLayer
from baklava.runtime.selection import keep_priority

METHODS = ("full", "uniform", "streaming", "layer", "pyramid", "adakv", "baklava")
MIN_CAP = 16


@dataclass
class MethodContext:
    """What the methods need besides the budget: profile scores and the searched BaKlaVa params."""

    scores: HeadScores
    eviction: EvictionConfig
    baklava_params: dict  # budget -> allocator parameters (from the perplexity search)


def total_slots(fraction: float, shape: tuple[int, int], context: int) -> int:
    layers, heads = shape
    floor = layers * heads * min(MIN_CAP, context)
    return max(floor, round(fraction * layers * heads * context))


def plan(
    method: str, fraction: float, context: int, ctx: MethodContext, full: BudgetedCache
) -> tuple[np.ndarray, EvictionConfig]:
    """Capacities and eviction of ``method`` at ``fraction`` of a ``context``-token cache."""
    shape = ctx.scores.shape
    if method == "full":
        return full.capacities.copy(), ctx.eviction
    total = total_slots(fraction, shape, context)
    min_cap = min(MIN_CAP, context)
    if method == "adakv":
        return adaptive_capacities(full, total, context, ctx.eviction), ctx.eviction
    eviction = replace(ctx.eviction, policy="ring") if method == "streaming" else ctx.eviction
    name = "uniform" if method == "streaming" else method
    params = ctx.baklava_params.get(fraction, {}) if method == "baklava" else {}
    caps = make_allocator(name, **params).allocate(ctx.scores, total, min_cap=min_cap, max_cap=context)
    return caps, eviction


def adaptive_capacities(
    full: BudgetedCache, total: int, context: int, eviction: EvictionConfig, floor_frac: float = 0.2
) -> np.ndarray:
    """AdaKV-like capacities from a cache that holds the whole prefill (scores of every token)."""
    layers = len(full.layers)
    per_layer = water_fill(total, np.ones(layers), np.zeros(layers, np.int64), np.full(layers, 10**12))
    caps = []
    for layer, budget in zip(full.layers, per_layer, strict=True):
        counts = _top_token_counts(layer, int(budget), eviction)  # [H_kv]
        heads = len(layer.capacities)
        floor = max(min(MIN_CAP, context), int(floor_frac * budget / heads))
        caps.append(water_fill(int(budget), counts, np.full(heads, floor), np.full(heads, context)))
    return np.stack(caps)


def _top_token_counts(layer: BudgetedLayer, budget: int, eviction: EvictionConfig) -> np.ndarray:
    """Mean over rows of how many of the layer's top-``budget`` tokens each head holds."""
    priorities, owner = [], []
    for h, off in enumerate(layer.offsets):
        n = int(layer.fill[:, h].max())
        live = torch.arange(n, device=layer.device)[None, :] < layer.fill[:, h, None]
        priorities.append(
            keep_priority(
                layer.positions[:, off : off + n],
                layer.scores[:, off : off + n],
                live,
                layer.valid_seen,
                sink=eviction.sink,
                window=eviction.window,
                policy="h2o",
            )
        )
        owner.append(torch.full((n,), h, device=layer.device))
    pri, owner = torch.cat(priorities, 1), torch.cat(owner)
    top = pri.topk(min(budget, pri.shape[1]), dim=1).indices  # [B, k]
    counts = torch.zeros(pri.shape[0], len(layer.offsets), device=layer.device)
    counts.scatter_add_(1, owner[top], torch.ones_like(top, dtype=counts.dtype))
    return counts.mean(0).cpu().numpy()
