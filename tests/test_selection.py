"""Keep priorities: tiers stay apart and attention scores keep their precision."""

import torch

from baklava.runtime.selection import chronological_keep, keep_priority, snapkv_pool


def _keep(scores, positions, seen, keep, *, sink=0, window=0, policy="h2o"):
    scores = torch.tensor([scores], dtype=torch.float32)
    positions = torch.tensor([positions])
    valid = torch.ones_like(positions, dtype=torch.bool)
    pri = keep_priority(
        positions, scores, valid, torch.tensor([seen]), sink=sink, window=window, policy=policy
    )
    return chronological_keep(pri, valid, keep)[0].tolist()


def test_small_scores_are_ranked_not_rounded_into_ties():
    # Typical accumulated attention is far below 0.1; the top two here are slots 1 and 3.
    # (With the scored tier at 1e15 + score, float64 steps of 0.125 made these all equal and the
    # two oldest tokens were kept instead.)
    assert _keep([0.010, 0.050, 0.002, 0.031, 0.0001], [0, 1, 2, 3, 4], seen=5, keep=2) == [1, 3]
    assert _keep([1e-6, 3e-6, 2e-6], [0, 1, 2], seen=3, keep=1) == [1]


def test_tiers_sink_then_window_then_score():
    # sink 1 (position 0), window 1 (position 5); the body's best score is slot 2 even though
    # slot 4's score would beat nothing in a higher tier.
    scores = [0.0, 0.3, 0.9, 0.1, 0.2, 0.0]
    assert _keep(scores, list(range(6)), seen=6, keep=3, sink=1, window=1) == [0, 2, 5]
    # a huge score never lifts a body token above the window or the sink
    assert _keep([0.0, 1e9, 0.0], [0, 1, 2], seen=3, keep=2, sink=1, window=1) == [0, 2]


def test_ring_keeps_the_most_recent_body_tokens():
    assert _keep([9.0, 0.0, 0.0, 0.0], [0, 1, 2, 3], seen=4, keep=2, policy="ring") == [2, 3]


def test_snapkv_pool_pools_each_row_of_any_leading_shape_alone():
    scores = torch.zeros(2, 3, 9)
    scores[0, 1, 4] = 1.0  # one peak: pooled over its 3 neighbours, in its own row only
    scores[1, 2, 0] = 2.0  # at the edge: padding adds nothing
    pooled = snapkv_pool(scores, 3)
    assert pooled.shape == (2, 3, 9)
    assert pooled[0, 1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert pooled[1, 2].tolist() == [2, 2, 0, 0, 0, 0, 0, 0, 0]
    assert pooled.sum() == 3 + 4  # every other row stays zero
    assert torch.equal(pooled.view(6, 9), snapkv_pool(scores.view(6, 9), 3))
