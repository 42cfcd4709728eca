"""Attention dispersion (AdaKV-style alternative): normalised entropy of each attention row.

A head whose attention concentrates on a few tokens can be served by a small cache; a head that
spreads attention widely needs many tokens. The entropy of row ``t`` is divided by ``log(t+1)``
(its maximum under causal masking), so scores lie in ``[0, 1]`` whatever the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from baklava.profiles.scorers.base import HeadScorer


@dataclass
class EntropyScorer(HeadScorer):
    """``H(a_t) / log(t + 1)`` per query head and token."""

    name = "entropy"

    def score(self, *, query, values, weights, output) -> torch.Tensor:
        s = self.skip_first
        w = weights[:, :, s:].float()
        ent = -(w * torch.log(w.clamp_min(1e-12))).sum(-1)  # [B, H_q, S']
        t = torch.arange(s, weights.shape[-2], device=w.device, dtype=torch.float32)
        return ent / torch.log(t + 1.0).clamp_min(math.log(2.0))  # row 0 (one key) scores 0
