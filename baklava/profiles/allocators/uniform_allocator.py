"""Uniform allocation: every KV head gets the same capacity (the baseline BaKlaVa improves on)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baklava.profiles.allocators.base import Allocator
from baklava.profiles.head_scores import HeadScores


@dataclass
class UniformAllocator(Allocator):
    """Same capacity for every head (remainder slots go to the first heads, one each)."""

    name = "uniform"

    def weights(self, scores: HeadScores) -> np.ndarray:
        return np.ones(scores.shape)
