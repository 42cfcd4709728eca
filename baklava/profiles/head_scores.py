"""The importance scores a profiler produces and allocators consume."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class HeadScores:
    """Importance of every KV head and every layer.

    Attributes
    ----------
    kv_head : np.ndarray
        ``[L, H_kv]`` float, larger means the head needs more cache.
    layer : np.ndarray
        ``[L]`` float, the layer-level proxy (1 - cos of the attention block's input and output).
    method : str
        Which head scorer produced ``kv_head`` (``"cosine"``, ``"entropy"``, ...).
    raw : dict
        Raw statistics kept in the profile: per query head means/stds of every scorer, token
        counts, calibration description.
    """

    kv_head: np.ndarray
    layer: np.ndarray
    method: str = "cosine"
    raw: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kv_head = np.asarray(self.kv_head, dtype=np.float64)
        self.layer = np.asarray(self.layer, dtype=np.float64)
        if self.kv_head.ndim != 2:
            raise ValueError(f"kv_head scores must be [L, H_kv], got shape {self.kv_head.shape}")
        if self.layer.shape != (self.kv_head.shape[0],):
            raise ValueError(f"layer scores must be [L]={self.kv_head.shape[0]}, got {self.layer.shape}")
        if not (np.isfinite(self.kv_head).all() and np.isfinite(self.layer).all()):
            raise ValueError("scores must be finite")

    @property
    def shape(self) -> tuple[int, int]:
        return self.kv_head.shape  # type: ignore[return-value]

    @classmethod
    def constant(cls, num_layers: int, num_kv_heads: int) -> HeadScores:
        """Equal scores everywhere (what an unprofiled model gets)."""
        return cls(np.ones((num_layers, num_kv_heads)), np.ones(num_layers), method="constant")
