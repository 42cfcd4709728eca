"""Attention bias of a prefill chunk over a head's ``[stored slots | new tokens]``, in query blocks.

:meth:`baklava.runtime.packed_cache.BudgetedLayer.attend` runs SDPA per KV head for prefill
chunks; these helpers keep its memory bounded for long prompts: queries go ``QUERY_BLOCK`` at a
time, and each block's bias rows are built only when that block runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 2048  # long prefills attend in blocks of queries: the math kernel's memory stays bounded


class HeadBias:
    """One head's additive attention bias over ``[stored slots | new tokens]``, materialised only
    for the query rows asked for: the stored part is one row ``[B, n]`` (slots past ``fill``
    masked), the new part the model's ``[B, 1, q, q]``. A 32k-token prefill thus never holds a
    ``[B, 1, q, n + q]`` tensor (24 GiB at batch 12, which ran out of GPU memory)."""

    def __init__(self, stored: torch.Tensor, new: torch.Tensor):
        self.stored, self.new = stored, new

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        batch, n = self.stored.shape
        stored = self.stored[:, None, None, :].expand(batch, 1, hi - lo, n)
        return torch.cat([stored, self.new[:, :, lo:hi]], dim=-1)


def sdpa_in_query_blocks(q, k, v, bias: HeadBias, scale) -> torch.Tensor:
    """SDPA of ``q [B, g, q, D]`` with ``bias`` rows ``[B, 1, q, k]``, ``QUERY_BLOCK`` queries at a time."""
    q_len = q.shape[2]
    blocks = [
        F.scaled_dot_product_attention(
            q[:, :, i : i + QUERY_BLOCK],
            k,
            v,
            attn_mask=bias.rows(i, min(i + QUERY_BLOCK, q_len)),
            scale=scale,
        )
        for i in range(0, q_len, QUERY_BLOCK)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def new_token_bias(mask: torch.Tensor | None, batch: int, q_len: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, q, q]`` additive bias among the new tokens (causal when no mask is given)."""
    if mask is None:
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(q_len, q_len, dtype=like.dtype, device=like.device)
        bias.masked_fill_(~causal, torch.finfo(like.dtype).min)
        return bias.expand(batch, 1, q_len, q_len)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
        bias.masked_fill_(~mask, torch.finfo(like.dtype).min)
        mask = bias
    mask = mask[..., -q_len:].to(like.dtype)
    return mask.expand(batch, 1, q_len, q_len)
