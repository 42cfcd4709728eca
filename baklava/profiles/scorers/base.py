"""Head scorer interface: per query head, a per-token statistic of one attention call.

Scorers see what eager attention computes for one layer of one calibration sample and return,
per query head, the per-token values of their statistic. The profiler accumulates means and
standard deviations, then reduces query heads to their KV head (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class HeadScorer:
    """Base class; subclasses implement :meth:`score`.

    Parameters
    ----------
    skip_first : int
        Tokens at the start of each sample that are not scored (their attention has almost no
        choice, so they say little about the head).

    Class attributes: ``repeated`` scorers see the profiler's second pass, in which each window's
    first half is repeated (``[x, x]``), instead of the plain windows; ``group_reduce`` (``"mean"``
    or ``"max"``) reduces a KV head's query heads to its score.
    """

    skip_first: int = 32
    name: ClassVar[str] = "base"
    repeated: ClassVar[bool] = False
    group_reduce: ClassVar[str] = "mean"

    def __post_init__(self) -> None:
        if self.skip_first < 0:
            raise ValueError("skip_first must be >= 0")

    def score(
        self,
        *,
        query: torch.Tensor,
        values: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
    ) -> torch.Tensor:
        """Per-token statistic.

        Parameters
        ----------
        query : torch.Tensor
            ``[B, H_q, S, D]``
        values : torch.Tensor
            ``[B, H_q, S, D]`` value vectors, repeated to the query heads (GQA).
        weights : torch.Tensor
            ``[B, H_q, S, S]`` attention probabilities (causal).
        output : torch.Tensor
            ``[B, H_q, S, D]`` attention output per head, before ``o_proj``.

        Returns
        -------
        torch.Tensor
            ``[B, H_q, S']`` float32 with ``S' = S - skip_first``.
        """
        raise NotImplementedError
