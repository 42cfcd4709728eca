"""Allocator interface and the water-filling core every allocator shares.

An allocator turns importance scores into integer capacities ``cap[layer][kv_head]`` such that

* every capacity lies in ``[min_cap, max_cap]`` (``max_cap`` is the reference context);
* capacities sum to the requested ``total`` exactly.

Each concrete allocator only decides two things: the per-head floor and the per-head weight of
the share above the floor (see :func:`water_fill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from baklava.errors import BudgetError
from baklava.profiles.head_scores import HeadScores


def water_fill(total: int, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Split ``total`` integer slots: ``lo`` each, the rest in proportion to ``weights``, capped at ``hi``.

    Heads that hit ``hi`` are frozen and their excess is redistributed among the others by weight
    (water filling). The real-valued result is rounded by largest remainder, so the integer result
    sums to ``total`` exactly and stays within ``[lo, hi]``.

    Parameters
    ----------
    total : int
        Slots to distribute; must satisfy ``lo.sum() <= total <= hi.sum()``.
    weights : np.ndarray
        Non-negative, any shape (same as ``lo``/``hi``). All-zero weights mean an even split.
    lo, hi : np.ndarray
        Integer bounds per head.
    """
    shape = np.shape(weights)
    w = np.asarray(weights, dtype=np.float64).ravel()
    lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), shape).ravel().copy()
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), shape).ravel().copy()
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    if (lo > hi).any():
        raise ValueError("lower bound above upper bound")
    if not lo.sum() <= total <= hi.sum():
        raise BudgetError(
            f"cannot split {total} slots over {lo.size} heads within [{lo.min()}, {hi.max()}] "
            f"(floors need {lo.sum()}, caps allow {hi.sum()})"
        )

    x = lo.astype(np.float64)
    free = x < hi
    remaining = float(total - lo.sum())
    while remaining > 1e-9 and free.any():
        wf = w[free]
        share = wf / wf.sum() if wf.sum() > 0 else np.full(wf.size, 1.0 / wf.size)
        proposed = x[free] + remaining * share
        over = proposed >= hi[free]
        if not over.any():
            x[free] = proposed
            break
        idx = np.flatnonzero(free)[over]
        x[idx] = hi[idx]
        free[idx] = False
        remaining = float(total - x.sum())

    base = np.floor(x + 1e-9).astype(np.int64)
    base = np.clip(base, lo, hi)
    short = total - int(base.sum())
    if short > 0:
        frac = x - base
        frac[base >= hi] = -np.inf  # never push a head past its cap
        order = np.argsort(-frac, kind="stable")[:short]
        base[order] += 1
    assert int(base.sum()) == total, (int(base.sum()), total)
    return base.reshape(shape)


@dataclass
class Allocator:
    """Base class: turn :class:`HeadScores` into integer capacities.

    Subclasses override :meth:`weights` (and optionally :meth:`floors`), and validate their
    parameters in ``__post_init__``.
    """

    name: ClassVar[str] = "base"

    def weights(self, scores: HeadScores) -> np.ndarray:
        """``[L, H_kv]`` non-negative weights of the share above the floors."""
        raise NotImplementedError

    def floors(self, scores: HeadScores, total: int, min_cap: int) -> np.ndarray:
        """``[L, H_kv]`` per-head floors; default: ``min_cap`` everywhere."""
        return np.full(scores.shape, min_cap, dtype=np.int64)

    def params(self) -> dict:
        """Parameters recorded in the profile file."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def allocate(self, scores: HeadScores, total: int, *, min_cap: int, max_cap: int) -> np.ndarray:
        """Capacities ``[L, H_kv]`` (int64) in ``[min_cap, max_cap]`` summing to ``total``.

        Raises
        ------
        BudgetError
            When ``total`` is below ``L * H_kv * min_cap`` or above ``L * H_kv * max_cap``.
        """
        n = scores.kv_head.size
        if min_cap < 1:
            raise BudgetError(f"min_cap must be >= 1, got {min_cap}")
        if min_cap > max_cap:
            raise BudgetError(f"min_cap {min_cap} is above the context {max_cap}")
        if total < n * min_cap:
            raise BudgetError(
                f"budget of {total} token slots is smaller than the floor of {n} heads x "
                f"min_cap {min_cap} = {n * min_cap}; raise the budget or lower --min-cap"
            )
        if total > n * max_cap:
            raise BudgetError(f"budget of {total} token slots exceeds the full cache {n} x {max_cap}")
        lo = np.minimum(np.maximum(self.floors(scores, total, min_cap), min_cap), max_cap)
        if lo.sum() > total:  # floors derived from the budget can never exceed it, but stay safe
            lo = np.full(scores.shape, min_cap, dtype=np.int64)
        return water_fill(total, self.weights(scores), lo, np.full(scores.shape, max_cap))
