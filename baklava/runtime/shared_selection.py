"""One token ranking for every head: the heads the allocation favours choose for all of them.

A compressed cache lets each head keep its own top tokens by its own scores (SnapKV's attention of
the last queries, or the reconstruction scores). With BaKlaVa's skewed capacities that splits the
model: a few favoured heads keep most of the context while the many heads at the floor keep a
small set of their own, mostly different tokens, and a token the retrieval heads read is missing
from the heads that carry it onwards. Shared selection ranks the context once and lets every head
keep the top of that one ranking (a head of capacity ``c`` keeps the best ``c``; smaller heads keep
a subset of what larger ones keep)::

    scores [L][B, slots] ──normalise per head──▶ importance-weighted mean over favoured heads
                                                    │  (capacity above the even share)
                         every head's scores  ◀─────┘  then BudgetedCache.compressed(capacities)

It pays below budget 0.2 and costs from there on, on both models measured (quality suite, H100,
BENCHMARKS.md; average of both settings, own scores -> shared): SmolLM2-135M 0.104 -> 0.116 at 0.05,
0.075 -> 0.133 at 0.1, but 0.167 -> 0.154 at 0.2 and 0.215 -> 0.183 at 0.3; Qwen2.5-Coder-0.5B
(16k + 32k) 0.432 -> 0.487, 0.499 -> 0.552, then 0.617 -> 0.599 and 0.627 -> 0.612. With a fifth
of the context or more, the heads at the floor do better with their own picks, so
:func:`use_shared` switches at :data:`SHARED_BELOW` (the budget where the reconstruction scores
stop being pooled too, :data:`baklava.runtime.reconstruction.UNPOOLED_FROM`). Blending the two
(every head keeps by half its own normalised scores, half the shared ranking) lands between them
and wins at no budget (SmolLM2, 0.1 to 0.3, 8 prompts per task and length).

It needs a cache in which every head still holds every token in the same slot (a prefill that
never evicted, as the quality benchmark's shared prefill and the reconstruction scores do), because
the ranking is per position.
"""

from __future__ import annotations

import numpy as np
import torch

SHARED_BELOW = 0.2  # budgets (fractions of the full cache) below which every head shares one ranking
SELECTIONS = ("auto", "shared", "own")  # auto: shared below SHARED_BELOW, each head's own from it


def use_shared(selection: str, budget: float) -> bool:
    """Whether ``selection`` (one of :data:`SELECTIONS`) ranks the tokens once at ``budget``."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}")
    return selection == "shared" or (selection == "auto" and budget < SHARED_BELOW)


def favoured_weights(capacities: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """``[L, H_kv]`` weights of the heads whose scores rank the tokens.

    The heads above the even share of the budget, weighted by their profiled importance; with no
    head above it (a uniform split) every head, by importance; all-zero importance counts equally.
    """
    caps = np.asarray(capacities, dtype=np.float64)
    weights = np.clip(np.asarray(importance, dtype=np.float64), 0.0, None)
    if weights.shape != caps.shape:
        raise ValueError(f"importance {weights.shape} does not match capacities {caps.shape}")
    favoured = caps > caps.mean()
    if favoured.any():
        weights = np.where(favoured, weights, 0.0)
    if weights.sum() <= 0:
        weights = favoured.astype(np.float64) if favoured.any() else np.ones_like(caps)
    return weights / weights.sum()


@torch.inference_mode()
def share_scores(cache, capacities: np.ndarray, importance: np.ndarray) -> None:
    """Set every head's scores in ``cache`` to one shared ranking (module docstring), in place.

    Parameters
    ----------
    cache : BudgetedCache
        Every head of every layer holds the same tokens in the same slots (nothing evicted).
    capacities : np.ndarray
        ``[L, H_kv]`` the capacities the cache is about to be compressed to.
    importance : np.ndarray
        ``[L, H_kv]`` profiled head importance (``HeadScores.kv_head``).
    """
    layers = cache.layers
    weights = favoured_weights(capacities, importance)
    first = layers[0]
    width = int(first.fill.max())
    fill = first.fill[:, :1]  # [B, 1]
    positions = first.positions[:, :width]
    for layer in layers:
        if bool((layer.fill != fill).any()) or any(
            not torch.equal(layer.positions[:, off : off + width], positions) for off in layer.offsets
        ):
            raise ValueError(
                "shared selection needs every head to hold the same tokens (a cache that never evicted)"
            )
    live = torch.arange(width, device=first.device)[None, :] < fill  # [B, width]
    shared = torch.zeros(live.shape, dtype=torch.float32, device=first.device)
    for i, layer in enumerate(layers):
        for h, off in enumerate(layer.offsets):
            if weights[i, h] > 0:
                s = layer.scores[:, off : off + width].float().masked_fill(~live, 0)
                shared += float(weights[i, h]) * s / s.amax(1, keepdim=True).clamp_min(1e-12)
    for layer in layers:
        for off in layer.offsets:
            layer.scores[:, off : off + width] = shared
