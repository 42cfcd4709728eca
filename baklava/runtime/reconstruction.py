"""Query-agnostic token scores by context reconstruction (KVzip-style).

A cache compressed at the end of a prefill keeps what the prompt's own last tokens attended to
(SnapKV). That is right when the question is in the prompt; when it comes later (a document or a
chat history cached for many questions) the last tokens know nothing of it, and a needle the
question will ask for is evicted as readily as filler.

Reconstruction scores ask a different question of the model: which stored tokens does it need to
*reproduce the context*? After the context is prefilled into a cache that has not evicted, the
model reads ``"Repeat the previous context exactly."`` followed by the context again, one chunk
at a time, attending to the stored context and to the chunk itself. Every stored token's new
score is the largest attention weight any of those queries (any query head of its group) pays
it. The probe's own tokens are never stored: the cache's slots, positions and fill levels are
unchanged, only its scores are replaced, so :meth:`BudgetedCache.compressed` then keeps by them.

::

    context ──prefill (no eviction)──▶ cache ──probe: prompt + context[chunk], per chunk──▶ max attention
                                                                                      │
                                         cache.scores  ◀── max-pool over neighbours ◀─┘

The cost is a second pass over the context (its attention reads the stored context once per
chunk), paid once per cached context, not per question.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baklava.runtime import prefill_attention
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.generate import positions_from_mask
from baklava.runtime.selection import snapkv_pool

PROMPT = "\n\nRepeat the previous context exactly.\n\n"
UNPOOLED_FROM = 0.2  # budgets from here on keep the reconstruction scores unpooled (pool_width)
CHUNK = 2048  # context tokens repeated per probe pass (KVzip's chunking: memory stays bounded)
SCORE_BLOCK = 256  # probe queries whose attention weights are materialised at a time


class ReconstructionProbe:
    """Stands in for a layer's commit while the probe runs: attends, records, stores nothing.

    ``best [B, sum(cap)]`` holds each slot's largest attention weight seen so far.
    """

    def __init__(self, layer):
        self.best = torch.zeros_like(layer.scores)

    def attend(self, layer, query, k_new, v_new, new_bias, valid_new, scaling) -> torch.Tensor:
        """``[B, q, H_q, D]`` attention output of a probe chunk; updates :attr:`best`."""
        batch, q_heads, q_len, _ = query.shape
        group = q_heads // layer.num_heads
        out = query.new_empty(batch, q_heads, q_len, v_new.shape[-1])
        q_ok = valid_new.to(torch.float32)[:, None, :, None]  # [B, 1, q, 1] padding queries count 0
        for h in range(layer.num_heads):
            n, qh, k_g, v_g, bias = prefill_attention.head_inputs(layer, h, query, k_new, v_new, new_bias)
            out[:, h * group : (h + 1) * group] = prefill_attention.sdpa_in_query_blocks(
                qh, k_g, v_g, bias, scaling
            )
            off = layer.offsets[h]
            best = self.best[:, off : off + n]
            keys_t = k_g[:, :1].float().transpose(-1, -2)  # [B, 1, D, n + q]: one KV head
            for lo in range(0, q_len, SCORE_BLOCK):
                hi = min(lo + SCORE_BLOCK, q_len)
                logits = (qh[:, :, lo:hi].float() @ keys_t) * scaling  # [B, g, blk, n + q]
                probs = torch.softmax(logits + bias.rows(lo, hi).float(), dim=-1)[..., :n]
                best = torch.maximum(best, (probs * q_ok[:, :, lo:hi]).amax(dim=(1, 2)))
            self.best[:, off : off + n] = best
        return out.transpose(1, 2).contiguous()


def prompt_ids(tokenizer, prompt: str = PROMPT) -> list[int]:
    """The probe's instruction as token ids (no special tokens)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("the reconstruction prompt must not be empty")
    return list(ids)


@torch.inference_mode()
def score_by_reconstruction(
    model,
    cache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    instruction: Sequence[int],
    *,
    chunk: int = CHUNK,
    pool_kernel: int | None = None,
) -> list[torch.Tensor]:
    """Replace the scores of ``cache`` by reconstruction scores (module docstring); returns each
    layer's unpooled scores ``[B, sum(cap)]``, for :func:`pool_scores` at another width.

    Parameters
    ----------
    model
        The model ``cache`` was filled by, with the ``baklava`` attention enabled.
    cache : BudgetedCache
        Holds exactly the prefill of ``ids`` and has not evicted (every head keeps every token).
    ids, mask : torch.Tensor
        ``[B, S]`` the context as prefilled (left padding masked by ``mask``).
    instruction : sequence of int
        Token ids read before each repeated chunk (:func:`prompt_ids`).
    chunk : int
        Context tokens per probe pass.
    pool_kernel : int, optional
        Max-pool width over neighbouring slots (default: the cache's ``eviction.pool_kernel``), as
        the SnapKV scores it replaces are pooled.
    """
    if not instruction:
        raise ValueError("the reconstruction prompt must not be empty")
    layers = cache.layers
    seen = ids.shape[1]
    if any(not layer.is_initialized or layer.seen != seen for layer in layers):
        raise ValueError(f"the cache must hold exactly the {seen}-token prefill of ids")
    valid = mask.sum(1)  # [B] real tokens per row
    if any(bool((layer.fill != valid[:, None]).any()) for layer in layers):
        raise ValueError("the cache has evicted: reconstruction scores need every context token stored")
    batch = ids.shape[0]
    prefix = torch.tensor(list(instruction), dtype=ids.dtype, device=ids.device).expand(batch, -1)
    probes = [ReconstructionProbe(layer) for layer in layers]
    for layer, probe in zip(layers, probes, strict=True):
        layer.probe = probe
    try:
        for lo in range(0, seen, chunk):
            part = torch.cat([prefix, ids[:, lo : lo + chunk]], dim=1)
            part_mask = torch.cat([torch.ones_like(prefix), mask[:, lo : lo + chunk]], dim=1)
            full_mask = torch.cat([mask, part_mask], dim=1)  # the stored context, then this pass
            model(
                input_ids=part,
                attention_mask=full_mask,
                position_ids=positions_from_mask(full_mask)[:, -part.shape[1] :],
                **forward_cache(model, cache),
                logits_to_keep=1,
            )
    finally:
        for layer in layers:
            layer.probe = None
    raw = [probe.best for probe in probes]
    pool_scores(cache, raw, pool_kernel)
    return raw


def pool_scores(cache, raw: Sequence[torch.Tensor], width: int | None = None) -> None:
    """Set ``cache``'s scores to the unpooled reconstruction scores ``raw`` (one tensor per layer,
    from :func:`score_by_reconstruction`) max-pooled over ``width`` neighbouring slots (default:
    each layer's ``eviction.pool_kernel``); slots past a head's fill score 0."""
    for layer, best in zip(cache.layers, raw, strict=True):
        kernel = layer.eviction.pool_kernel if width is None else width
        for h, (off, cap) in enumerate(zip(layer.offsets, layer.capacities, strict=True)):
            live = torch.arange(cap, device=layer.device)[None, :] < layer.fill[:, h, None]  # [B, cap]
            pooled = snapkv_pool(best[:, off : off + cap], kernel)
            layer.scores[:, off : off + cap] = pooled.masked_fill(~live, 0)


def pool_width(budget: float, pool_kernel: int) -> int:
    """The pool width for reconstruction scores at ``budget`` (``"auto"`` in the quality benchmark):
    none (1) from :data:`UNPOOLED_FROM` on, ``pool_kernel`` below.

    Measured on Qwen2.5-Coder-0.5B, 16k + 32k, query-agnostic (BENCHMARKS.md): without pooling,
    BaKlaVa keeps more separate needles when there is room (0.2: 0.415 against 0.339 with a 31-wide
    pool; 0.3: 0.520 against 0.453; 0.5: 0.616 against 0.568), but at 0.1 and below a needle's
    tokens kept without their neighbours are lost (0.1: 0.095 against 0.191).
    """
    return 1 if budget >= UNPOOLED_FROM else pool_kernel
