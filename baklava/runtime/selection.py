"""Which tokens a head keeps: priorities for sink, recent window and scored tokens.

Pure tensor functions shared by the packed cache (and, later, mirrored by the GPU kernels and
the ONNX ops). A candidate's priority is lexicographic ``(tier, key)``:

========  =====================================  ============================
tier      candidates                             key within the tier
========  =====================================  ============================
3         sink: position < sink                  earlier first
2         recent window: position >= seen-window later first
0         everything else                        score (h2o) or position (ring)
-inf      empty slots and padding tokens         never kept
========  =====================================  ============================

The scored tier sits at offset 0, not at ``TIER``: near 1e15 a float64 step is 0.125, so
``TIER + score`` would round every attention score below ~0.06 to the same value and the
"top scores" would silently become "the oldest tokens". Scores are >= 0 and far below ``TIER``
(each step adds at most 1 per slot), so the tiers stay apart and scores keep full precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIER = 1e15  # far above any score or position, exact in float64


def keep_priority(
    positions: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    seen_after: torch.Tensor,
    *,
    sink: int,
    window: int,
    policy: str,
) -> torch.Tensor:
    """Priority of each candidate token; keep the top ``cap``.

    Parameters
    ----------
    positions : torch.Tensor
        ``[B, N]`` int64 token positions (count of non-padding tokens before it in its row).
    scores : torch.Tensor
        ``[B, N]`` float accumulated attention (ignored by ``policy="ring"``).
    valid : torch.Tensor
        ``[B, N]`` bool, False for empty slots and padding.
    seen_after : torch.Tensor
        ``[B]`` int64 non-padding tokens seen once this step is committed.

    Returns
    -------
    torch.Tensor
        ``[B, N]`` float64.
    """
    pos = positions.to(torch.float64)
    is_sink = positions < sink
    is_recent = positions >= (seen_after[:, None] - window)
    body = pos if policy == "ring" else scores.to(torch.float64)
    pri = torch.where(is_recent, 2 * TIER + pos, body)
    pri = torch.where(is_sink, 3 * TIER - pos, pri)
    return pri.masked_fill(~valid, float("-inf"))


def snapkv_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool ``[..., N]`` scores along ``N`` over ``kernel`` neighbours (SnapKV keeps clusters,
    not points); each leading index pools alone."""
    if kernel <= 1 or scores.shape[-1] <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).view(scores.shape)


def chronological_keep(priority: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices ``[B, keep]`` of the top-``keep`` candidates, valid ones first, in candidate order.

    Equal priorities (SnapKV pooling makes neighbours tie) go to the lower candidate index, i.e.
    the older token, as ONNX ``TopK`` defines it. Keeping slots in arrival order makes a
    never-evicting cache bit-compatible with a dense one.
    """
    idx = priority.sort(dim=1, descending=True, stable=True).indices[:, :keep]
    kept_valid = valid.gather(1, idx)
    order = idx + (~kept_valid).to(idx.dtype) * priority.shape[1]
    return idx.gather(1, order.argsort(dim=1))
