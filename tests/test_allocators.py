import numpy as np
import pytest

from baklava.errors import BudgetError
from baklava.profiles.allocators import (
    ALLOCATORS,
    BaklavaAllocator,
    LayerAllocator,
    make_allocator,
    water_fill,
)
from baklava.profiles.head_scores import HeadScores

RNG = np.random.default_rng(0)


def scores(num_layers=6, num_heads=3, seed=0):
    rng = np.random.default_rng(seed)
    return HeadScores(rng.uniform(0.05, 1.0, (num_layers, num_heads)), rng.uniform(0.0, 0.4, num_layers))


def check_caps(caps, total, min_cap, max_cap, shape):
    assert caps.shape == shape
    assert caps.dtype == np.int64
    assert int(caps.sum()) == total
    assert caps.min() >= min_cap
    assert caps.max() <= max_cap


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("shape", [(6, 3), (1, 1), (30, 3), (4, 8)])
def test_every_allocator_exact_sum_and_bounds(name, fraction, shape):
    s = scores(*shape)
    context, min_cap = 1024, 8
    total = max(round(fraction * context * s.kv_head.size), min_cap * s.kv_head.size)
    caps = make_allocator(name).allocate(s, total, min_cap=min_cap, max_cap=context)
    check_caps(caps, total, min_cap, context, shape)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_budget_one_gives_full_context_everywhere(name):
    s = scores()
    caps = make_allocator(name).allocate(s, 1024 * s.kv_head.size, min_cap=16, max_cap=1024)
    assert (caps == 1024).all()


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_budget_below_floors_is_a_clear_error(name):
    s = scores()
    with pytest.raises(BudgetError, match="smaller than the floor"):
        make_allocator(name).allocate(s, 16 * s.kv_head.size - 1, min_cap=16, max_cap=1024)


def test_budget_exactly_at_floors():
    s = scores()
    caps = BaklavaAllocator(sharpness=3).allocate(s, 16 * s.kv_head.size, min_cap=16, max_cap=1024)
    assert (caps == 16).all()


def test_single_head_gets_everything():
    s = HeadScores(np.array([[0.7]]), np.array([0.1]))
    for name in ALLOCATORS:
        assert make_allocator(name).allocate(s, 300, min_cap=4, max_cap=1024).tolist() == [[300]]


def test_baklava_follows_importance():
    s = scores(seed=3)
    caps = BaklavaAllocator(sharpness=1.0, floor_frac=0.1).allocate(s, 2000, min_cap=8, max_cap=1024)
    order = np.argsort(s.kv_head.ravel())
    assert (np.diff(caps.ravel()[order]) >= -1).all()  # monotone up to rounding
    assert caps.max() > 2 * caps.min()


def test_sharpness_zero_is_uniform():
    s = scores()
    caps = BaklavaAllocator(sharpness=0.0).allocate(s, 18 * 100, min_cap=8, max_cap=1024)
    assert (caps == 100).all()


def test_layer_allocator_same_within_a_layer():
    s = scores(seed=5)
    caps = LayerAllocator(sharpness=2.0, floor_frac=0.0).allocate(s, 3 * 6 * 200, min_cap=4, max_cap=1024)
    assert (caps.max(1) - caps.min(1) <= 1).all()
    assert caps.sum(1)[np.argmax(s.layer)] == caps.sum(1).max()


def test_clamp_redistributes_excess():
    # one head is 100x more important: it is capped at the context, the rest share the excess
    kv = np.ones((2, 2))
    kv[0, 0] = 100.0
    s = HeadScores(kv, np.ones(2))
    caps = BaklavaAllocator(sharpness=1.0, floor_frac=0.0).allocate(s, 2000, min_cap=1, max_cap=1024)
    assert caps[0, 0] == 1024
    assert caps.sum() == 2000
    assert caps.ravel()[1:].max() - caps.ravel()[1:].min() <= 1


def test_water_fill_random_properties():
    for _ in range(200):
        n = int(RNG.integers(1, 40))
        w = RNG.exponential(size=n) * (RNG.random(n) > 0.2)
        lo = RNG.integers(0, 5, n)
        hi = lo + RNG.integers(0, 50, n)
        total = int(RNG.integers(lo.sum(), hi.sum() + 1))
        x = water_fill(total, w, lo, hi)
        assert x.sum() == total and (x >= lo).all() and (x <= hi).all()


def test_invalid_parameters():
    with pytest.raises(ValueError):
        BaklavaAllocator(sharpness=-1)
    with pytest.raises(ValueError):
        BaklavaAllocator(floor_frac=1.5)
    with pytest.raises(ValueError):
        make_allocator("nope")
