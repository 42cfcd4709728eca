"""A context compressed before its question: the quality benchmark's path, for users.

A document or a chat history cached for questions that come later is best compressed the way the
quality benchmark measures it (BENCHMARKS.md), not the way a chunked prefill compresses a prompt
as it arrives (SnapKV scores from its own last tokens, which know nothing of the question)::

    context ──prefill, room for all of it──▶ full cache ──reconstruction scores (reconstruction.py)──▶
      below budget 0.2: one ranking shared by every head (shared_selection.py)
        ──compressed(profile's capacities)──▶ cache; then prefill the question into it and decode

The full cache is transient (the context's whole KV, once); what stays is exactly the budget.
"""

from __future__ import annotations

import numpy as np
import torch

from baklava.errors import BaklavaError
from baklava.runtime.attention import enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.packed_cache import BudgetedCache
from baklava.runtime.reconstruction import pool_width, prompt_ids, score_by_reconstruction
from baklava.runtime.shared_selection import share_scores, use_shared


@torch.inference_mode()
def compress_context(
    model,
    tokenizer,
    profile,
    context_ids,
    *,
    selection: str = "auto",
    pool: int | str = "auto",
    budget: float | None = None,
) -> BudgetedCache:
    """A :class:`BudgetedCache` of ``profile`` 's capacities holding ``context_ids`` (``[S]`` or
    ``[B, S]`` without padding) compressed as the quality benchmark compresses a context read
    before its question (module docstring).

    ``selection``: ``"auto"`` (one shared ranking below budget 0.2 of this context, each head its
    own from there), ``"shared"`` or ``"own"``; ``pool``: max-pool width of the reconstruction
    scores, or ``"auto"`` (:func:`~baklava.runtime.reconstruction.pool_width`); ``budget``: the
    fraction those ``"auto"`` choices go by (default: the share of this context the capacities
    keep; the quality benchmark passes its nominal budget).
    """
    ids = torch.as_tensor(context_ids, dtype=torch.long)
    ids = (ids[None] if ids.dim() == 1 else ids).to(next(model.parameters()).device)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise BaklavaError(f"context_ids must be [S] or [B, S] with S >= 1, got shape {tuple(ids.shape)}")
    enable(model)
    caps = profile.capacities_for(model.config)
    length = ids.shape[1]
    full = BudgetedCache(np.full(caps.shape, length), profile.eviction, profile.kv_format)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, **forward_cache(model, full), logits_to_keep=1)
    fraction = budget if budget is not None else min(1.0, float(caps.mean()) / length)
    width = pool_width(fraction, profile.eviction.pool_kernel) if pool == "auto" else pool
    score_by_reconstruction(model, full, ids, mask, prompt_ids(tokenizer), pool_kernel=width)
    if use_shared(selection, fraction):
        share_scores(full, caps, profile.scores.kv_head)
    return full.compressed(caps, profile.eviction)
