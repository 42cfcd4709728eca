"""BaKlaVa allocation: a floor for every head, the rest split by profiled head importance.

Seed 000 (BaKlaVa): heads whose attention output stays close to its input need little cache,
heads that move information need a lot. Capacity of head ``i``::

    cap_i = floor + (total - sum(floor)) * s_i**sharpness / sum_j s_j**sharpness

clamped to ``[min_cap, context]`` with the excess redistributed (water filling), rounded by
largest remainder so the sum is exact. ``floor = max(min_cap, floor_frac * total / n_heads)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baklava.profiles.allocators.base import Allocator
from baklava.profiles.head_scores import HeadScores


def importance_weights(scores: np.ndarray, sharpness: float) -> np.ndarray:
    """``(s / mean(s)) ** sharpness`` with scores clipped positive; sharpness 0 is uniform."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, None)
    return (s / s.mean()) ** sharpness


# Every head keeps at least half the uniform share: the allocation search's default grid uses
# this floor (allocation_search.DEFAULT_FLOORS), so an allocation without the search
# (--no-search, --sharpness) deploys the same floor as one with it.
DEFAULT_FLOOR_FRAC = 0.5


@dataclass
class BaklavaAllocator(Allocator):
    """Per-head capacities from per-head importance.

    Parameters
    ----------
    sharpness : float
        Exponent on the normalised scores; 0 gives the uniform split, larger is more skewed.
    floor_frac : float
        Share of the uniform capacity every head keeps regardless of its score, in [0, 1].
    """

    sharpness: float = 1.0
    floor_frac: float = DEFAULT_FLOOR_FRAC
    name = "baklava"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.sharpness) and self.sharpness >= 0):
            raise ValueError(f"sharpness must be >= 0, got {self.sharpness}")
        if not 0 <= self.floor_frac <= 1:
            raise ValueError(f"floor_frac must be in [0, 1], got {self.floor_frac}")

    def weights(self, scores: HeadScores) -> np.ndarray:
        return importance_weights(scores.kv_head, self.sharpness)

    def floors(self, scores: HeadScores, total: int, min_cap: int) -> np.ndarray:
        floor = int(self.floor_frac * total / scores.kv_head.size)
        return np.full(scores.shape, max(min_cap, floor), dtype=np.int64)
