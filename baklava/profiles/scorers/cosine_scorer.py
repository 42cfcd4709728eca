"""BaKlaVa head importance: how much a head changes what it reads (seed 000).

For query head ``j`` at token ``t`` the head reads its own value ``v_t`` (what it would return
attending only to itself) and writes ``o_t = sum_s a_ts v_s``. A head whose output stays close to
its input can lose most of its cache; one that pulls in other tokens cannot::

    importance_jt = 1 - cos(v_t, o_t)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baklava.profiles.scorers.base import HeadScorer


@dataclass
class CosineScorer(HeadScorer):
    """``1 - cos(value_t, output_t)`` per query head and token, in ``[0, 2]``."""

    name = "cosine"

    def score(self, *, query, values, weights, output) -> torch.Tensor:
        s = self.skip_first
        cos = F.cosine_similarity(values[:, :, s:].float(), output[:, :, s:].float(), dim=-1, eps=1e-6)
        return 1.0 - cos
