"""Retrieval heads: how much attention a head pays to the token it would copy (induction score).

The profiler feeds this scorer a second pass in which each calibration window's first half is
repeated, ``[x_0 .. x_{m-1}, x_0 .. x_{m-1}]``. At position ``m + t`` of the second copy the text
has been seen before, and the token that comes next is ``x_{t+1}``, at position ``t + 1`` of the
first copy. Retrieval (induction) heads attend there: they are what copies a needle, a key or a
value out of a long context, and what a context compressed before its question must keep whole
(Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality"; DuoAttention).
The score of query head ``j`` at that position is its attention weight on the copy source::

    retrieval_jt = a_j[m + t, t + 1]          t = 0 .. m - 2

A KV head is as important as the most retrieving query head of its group (``group_reduce``): its
cache serves them all, so one retrieval head among seven is enough to need the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baklava.profiles.scorers.base import HeadScorer


@dataclass
class RetrievalScorer(HeadScorer):
    """Attention weight on the copy source, per query head and token of the repeated half."""

    name = "retrieval"
    repeated = True
    group_reduce = "max"

    def score(self, *, query, values, weights, output) -> torch.Tensor:
        seq = weights.shape[-1]
        if seq % 2 or seq < 4:
            raise ValueError(f"the retrieval scorer needs a window repeated twice, got {seq} tokens")
        m = seq // 2
        t = torch.arange(m - 1, device=weights.device)
        return weights[:, :, m + t, t + 1].float()  # [B, H_q, m - 1]
