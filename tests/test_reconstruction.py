"""Reconstruction scores (runtime/reconstruction.py) against eager attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from baklava.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.reconstruction import score_by_reconstruction
from baklava.runtime.selection import snapkv_pool

from .conftest import tiny_config

INSTRUCTION = [5, 6, 7]


def _reference_scores(model, ctx: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer ``[B, H_kv, S]``: the largest eager attention weight any probe query of a KV
    head's group pays each context token, over every chunk's pass (one sequence per pass)."""
    batch, seen = ctx.shape
    heads_kv = model.config.num_key_value_heads
    best = None
    for lo in range(0, seen, chunk):
        prefix = torch.tensor(INSTRUCTION).expand(batch, -1)
        seq = torch.cat([ctx, prefix, ctx[:, lo : lo + chunk]], dim=1)
        att = model(input_ids=seq, output_attentions=True).attentions  # L x [B, H_q, T, T]
        per_layer = []
        for a in att:
            probe_rows = a[:, :, seen:, :seen]  # [B, H_q, q, S]
            grouped = probe_rows.reshape(batch, heads_kv, -1, probe_rows.shape[2], seen)
            per_layer.append(grouped.amax(dim=(2, 3)))  # [B, H_kv, S]
        best = (
            per_layer if best is None else [torch.maximum(x, y) for x, y in zip(best, per_layer, strict=True)]
        )
    return best


@pytest.mark.parametrize("chunk", [48, 20])
def test_scores_equal_eager_attention_and_cache_is_untouched(chunk):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(attn_implementation="eager")).eval()
    ctx = torch.randint(3, 96, (2, 48))
    with torch.inference_mode():
        want = _reference_scores(model, ctx, chunk)
    enable(model)
    cache = BudgetedCache(np.full((2, 2), 64), EvictionConfig(pool_kernel=1))
    mask = torch.ones_like(ctx)
    with torch.inference_mode():
        model(input_ids=ctx, **forward_cache(model, cache))
        before = [
            {
                n: getattr(layer, n).clone()
                for n in ("keys", "values", "positions", "fill", "valid_seen", "scores")
            }
            for layer in cache.layers
        ]
        score_by_reconstruction(model, cache, ctx, mask, INSTRUCTION, chunk=chunk, pool_kernel=1)
    for layer, old, ref in zip(cache.layers, before, want, strict=True):
        for name in ("keys", "values", "positions", "fill", "valid_seen"):
            assert torch.equal(getattr(layer, name), old[name]), name
        assert layer.seen == 48 and layer.probe is None
        got = layer.scores.view(2, 2, 64)
        torch.testing.assert_close(got[..., :48], ref, rtol=1e-4, atol=1e-6)
        assert not got[..., 48:].any()  # empty slots score nothing
        assert not torch.equal(layer.scores, old["scores"])


def test_left_padded_rows_score_as_alone_and_pooling_applies(tiny_llama):
    """A row padded in a batch gets the scores it gets alone; scores are pooled like SnapKV's."""
    enable(tiny_llama)
    torch.manual_seed(1)
    long, short = torch.randint(3, 96, (1, 40)), torch.randint(3, 96, (1, 29))

    def scores(ids, mask, kernel):
        cache = BudgetedCache(np.full((2, 2), 40), EvictionConfig(pool_kernel=kernel))
        with torch.inference_mode():
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            tiny_llama(
                input_ids=ids, attention_mask=mask, position_ids=pos, **forward_cache(tiny_llama, cache)
            )
            score_by_reconstruction(tiny_llama, cache, ids, mask, INSTRUCTION, chunk=16)
        return [layer.scores for layer in cache.layers]

    padded = torch.cat([torch.zeros(1, 11, dtype=torch.long), short], dim=1)
    batch = torch.cat([long, padded])
    mask = torch.cat([torch.ones(1, 40), torch.cat([torch.zeros(1, 11), torch.ones(1, 29)], 1)]).long()
    together = scores(batch, mask, 3)
    # the padded row's first chunk holds only 5 real tokens: alone, its chunks start elsewhere, so
    # compare with the same chunk boundaries (11 pad tokens + 29 = chunks of 16 in the batch's frame)
    alone_ids = torch.cat([torch.zeros(1, 11, dtype=torch.long), short], dim=1)
    alone = scores(alone_ids, mask[1:], 3)
    for t, a in zip(together, alone, strict=True):
        torch.testing.assert_close(t[1], a[0], rtol=1e-4, atol=1e-6)
    raw = scores(batch, mask, 1)
    live = torch.arange(40)[None, :] < mask.sum(1, keepdim=True)  # [B, 40] slots past the fill stay 0
    for pooled, r in zip(together, raw, strict=True):
        for h in range(2):
            seg = slice(40 * h, 40 * h + 40)
            torch.testing.assert_close(pooled[:, seg], snapkv_pool(r[:, seg], 3).masked_fill(~live, 0))


def test_refuses_a_cache_that_has_evicted(tiny_llama):
    enable(tiny_llama)
    ids = torch.randint(3, 96, (1, 30))
    cache = BudgetedCache(np.full((2, 2), 10))
    with torch.inference_mode():
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, cache))
        with pytest.raises(ValueError, match="evicted"):
            score_by_reconstruction(tiny_llama, cache, ids, torch.ones_like(ids), INSTRUCTION)
        with pytest.raises(ValueError, match="empty"):
            score_by_reconstruction(tiny_llama, cache, ids, torch.ones_like(ids), [])
