"""Shared token selection: one ranking from the favoured heads, every head keeps the top of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.shared_selection import favoured_weights, share_scores, use_shared

CAPS = np.array([[40, 8], [8, 8]])  # head (0, 0) above the even share (16), the rest below
IMPORTANCE = np.array([[0.9, 0.1], [0.3, 0.0]])


def _prefilled(model, seen: int = 30) -> BudgetedCache:
    """A cache holding a ``seen``-token prefill in every head (nothing evicted), each head's slots
    scored at random (a tiny random model's SnapKV scores pick the same few tokens in every head)."""
    enable(model)
    ids = torch.randint(3, 96, (2, seen), generator=torch.Generator().manual_seed(3))
    cache = BudgetedCache(np.full((2, 2), seen + 4), EvictionConfig(sink=2, window=4, pool_kernel=1))
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        model(input_ids=ids, **forward_cache(model, cache))
        for layer in cache.layers:
            for off in layer.offsets:
                layer.scores[:, off : off + seen] = torch.rand(2, seen, generator=g)
    return cache


def test_weights_are_the_favoured_heads_by_importance():
    w = favoured_weights(CAPS, IMPORTANCE)
    np.testing.assert_allclose(w, [[1.0, 0.0], [0.0, 0.0]])
    two = favoured_weights(np.array([[30, 30], [2, 2]]), IMPORTANCE)
    np.testing.assert_allclose(two, [[0.9, 0.1], [0.0, 0.0]])
    # a uniform split favours no head: every head counts, by importance
    np.testing.assert_allclose(favoured_weights(np.full((2, 2), 16), IMPORTANCE), IMPORTANCE / 1.3)
    # favoured heads of zero importance count equally rather than not at all
    np.testing.assert_allclose(favoured_weights(CAPS, np.zeros((2, 2))), [[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="does not match"):
        favoured_weights(CAPS, np.ones(4))


def test_every_head_keeps_the_favoured_heads_top_tokens(tiny_llama):
    """After sharing, each head's kept tokens are the top of head (0, 0)'s own ranking (plus sink
    and window): smaller heads keep a subset of what larger ones keep."""
    cache = _prefilled(tiny_llama)
    guide = cache.layers[0].scores[:, : cache.layers[0].capacities[0]].clone()
    own = cache.compressed(CAPS)
    share_scores(cache, CAPS, IMPORTANCE)
    shared = cache.compressed(CAPS)
    small = ((0, 1), (1, 0), (1, 1))
    differs = False
    for b in range(2):
        kept = {
            (i, h): set(shared.layers[i].head_positions(h, b).tolist()) for i in range(2) for h in range(2)
        }
        assert kept[(0, 1)] == kept[(1, 0)] == kept[(1, 1)]  # equal capacities: the same tokens
        assert kept[(0, 1)] <= kept[(0, 0)]  # nested in the favoured head's larger set
        # the 8 slots: sink 2 + window 4 + the favoured head's 2 best of the rest
        body = guide[b, 2:26]
        best = set((torch.topk(body, 2).indices + 2).tolist())
        assert kept[(1, 1)] == {0, 1, 26, 27, 28, 29} | best
        differs |= any(set(own.layers[i].head_positions(h, b).tolist()) != kept[(i, h)] for i, h in small)
    assert differs  # without sharing the small heads pick their own tokens: the test tells the two apart


def test_refuses_a_cache_that_has_evicted(tiny_llama):
    enable(tiny_llama)
    cache = BudgetedCache(np.array([[40, 8], [40, 40]]))
    with torch.inference_mode():
        tiny_llama(input_ids=torch.randint(3, 96, (1, 30)), **forward_cache(tiny_llama, cache))
    before = [layer.scores.clone() for layer in cache.layers]
    with pytest.raises(ValueError, match="never evicted"):
        share_scores(cache, CAPS, IMPORTANCE)
    assert all(torch.equal(a, layer.scores) for a, layer in zip(before, cache.layers, strict=True))


def test_auto_shares_below_a_fifth_of_the_cache():
    assert [use_shared("auto", b) for b in (0.05, 0.1, 0.19, 0.2, 0.3, 1.0)] == [True] * 3 + [False] * 3
    assert use_shared("shared", 0.5) and not use_shared("own", 0.05)
    with pytest.raises(ValueError, match="unknown selection 'mine'"):
        use_shared("mine", 0.1)
