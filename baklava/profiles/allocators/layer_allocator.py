"""Layer-only allocation (SqueezeAttention-like): layers differ, heads within a layer do not.

SqueezeAttention measures each layer's importance as 1 - cos(input, output) of its attention
block and gives important layers more cache; every KV head of a layer gets the same capacity.
Same floor/sharpness form as :class:`~baklava.profiles.allocators.baklava_allocator.BaklavaAllocator`,
applied to the layer proxy broadcast over the layer's heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from baklava.profiles.allocators.baklava_allocator import BaklavaAllocator, importance_weights
from baklava.profiles.head_scores import HeadScores


@dataclass
class LayerAllocator(BaklavaAllocator):
    """Per-layer capacities from the layer proxy score (heads of a layer share it)."""

    name = "layer"

    def weights(self, scores: HeadScores) -> np.ndarray:
        w = importance_weights(scores.layer, self.sharpness)
        return np.repeat(w[:, None], scores.shape[1], axis=1)
