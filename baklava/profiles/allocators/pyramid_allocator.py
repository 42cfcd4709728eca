"""Pyramid allocation (PyramidKV-like): lower layers keep more, capacity shrinks linearly upward.

PyramidKV observes attention narrowing with depth and allocates an arithmetic sequence of
per-layer budgets; here the bottom layer's weight is ``ratio`` times the top layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baklava.profiles.allocators.base import Allocator
from baklava.profiles.head_scores import HeadScores


@dataclass
class PyramidAllocator(Allocator):
    """Linearly decreasing per-layer capacity, independent of any profile.

    Parameters
    ----------
    ratio : float
        Bottom-layer weight over top-layer weight, >= 1 (1 is uniform).
    """

    ratio: float = 4.0
    name = "pyramid"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.ratio) and self.ratio >= 1):
            raise ValueError(f"ratio must be >= 1, got {self.ratio}")

    def weights(self, scores: HeadScores) -> np.ndarray:
        num_layers, num_heads = scores.shape
        w = np.linspace(self.ratio, 1.0, num_layers) if num_layers > 1 else np.ones(1)
        return np.repeat(w[:, None], num_heads, axis=1)
