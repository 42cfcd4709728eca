"""Smoothed keys (``BudgetedLayer.smooth_keys``): quantized keys stored as ``(k - mean) * s``
with the query taken as ``q / s``.

Attention is blind to what every key of a head shares and to a per-channel scale the query undoes,
so both cost nothing exact; what they buy is quantization error: keys with a large shared offset
(Qwen2's k-projection bias) lose their per-token scale to it, and channels the queries weigh
heavily need finer steps than the rest. Checked on the CPU: exact attention unchanged, the error
attention sees, the state fixed at a row's first tokens and carried by pool rows (an engine
request alone = beside others).
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from baklava import kv_format
from baklava.eviction import EvictionConfig
from baklava.runtime import kv_slots
from baklava.runtime.packed_cache import BudgetedLayer
from baklava.runtime.sampling import SamplingParams
from tests.conftest import tiny_config
from tests.test_engine import _engine, _prompts

D = 32


def _keys(gen, batch, heads, n, offset):
    """Keys with a large offset shared by all tokens of a head (a few channels, like a bias)."""
    shared = torch.zeros(heads, D)
    shared[:, :4] = offset
    return torch.randn(batch, heads, n, D, generator=gen) + shared[None, :, None]


def _attend(layer, q, k, v):
    layer.update(k, v)
    return layer.attend(q, None, D**-0.5)[0]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_smoothing_cuts_the_error_attention_sees_and_keeps_the_mean_of_the_first_tokens(name, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    caps, batch, q_heads = [64, 64], 2, 4
    layers = {}
    for label, fmt, smooth in (("exact", None, False), ("plain", name, False), ("smooth", name, True)):
        monkeypatch.setattr(BudgetedLayer, "smooth_keys", smooth)
        layers[label] = BudgetedLayer(caps, EvictionConfig(), fmt)
    outs = {label: [] for label in layers}
    first = None
    for n in (24, 8, 1):  # two chunks and a decode step
        k, v, q = (
            _keys(gen, batch, 2, n, 40.0),
            torch.randn(batch, 2, n, D, generator=gen),
            torch.randn(batch, q_heads, n, D, generator=gen),
        )
        first = k.mean(2) if first is None else first
        for label, layer in layers.items():
            outs[label].append(_attend(layer, q, k, v))
    smooth = layers["smooth"]
    assert smooth.state_names[-2:] == ("key_mean", "key_scale") and layers["plain"].key_mean is None
    torch.testing.assert_close(smooth.key_mean, first)  # fixed by the first chunk, kept after
    for step in range(3):
        exact = outs["exact"][step]
        plain = (outs["plain"][step] - exact).abs().mean()
        smoothed = (outs["smooth"][step] - exact).abs().mean()
        assert smoothed < plain / 3, (step, float(smoothed), float(plain))
    # what is stored: the keys minus the row's mean, rounded by the format
    stored = smooth.stored("keys")[:, :24]  # head 0's first chunk
    assert stored.abs().max() < 10  # the offset of 40 is gone


def test_a_row_emptied_in_a_pool_takes_the_mean_of_its_next_tokens(monkeypatch):
    monkeypatch.setattr(BudgetedLayer, "smooth_keys", True)
    gen = torch.Generator().manual_seed(1)
    layer = BudgetedLayer([16, 16], EvictionConfig(), "int8")
    _attend(layer, torch.randn(2, 4, 6, D, generator=gen), _keys(gen, 2, 2, 6, 5.0), torch.randn(2, 2, 6, D))
    before, scale = layer.key_mean.clone(), layer.key_scale.clone()
    layer.valid_seen[1] = 0  # what SlotPool.reset_row does to row 1
    k, q = _keys(gen, 2, 2, 3, -7.0), torch.randn(2, 4, 3, D, generator=gen)
    _attend(layer, q, k, torch.randn(2, 2, 3, D))
    assert torch.equal(layer.key_mean[0], before[0]) and torch.equal(
        layer.key_scale[0], scale[0]
    )  # row 0 keeps
    torch.testing.assert_close(layer.key_mean[1], k[1].mean(1))  # row 1 starts again
    want = kv_slots.channel_balance(q[1:], k[1:] - k[1:].mean(2, keepdim=True))[0]
    torch.testing.assert_close(layer.key_scale[1], want)
    assert not torch.allclose(layer.key_scale[1], scale[1])


def test_an_engine_with_smoothed_int8_keys_serves_a_request_alone_as_beside_others(monkeypatch):
    monkeypatch.setattr(BudgetedLayer, "smooth_keys", True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    prompts = _prompts()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    single = _engine(model, 3, kv_format="int8")
    assert single.pool.cache.layers[0].state_names[-2:] == ("key_mean", "key_scale")
    alone = [single.generate([p], params)[0] for p in prompts]
    together = _engine(model, 3, max_prefill_tokens=32, kv_format="int8").generate(prompts, params)
    assert together == alone


def _skewed(gen, batch, heads, n, spreads):
    """``[B, heads, n, D]`` with channel ``c`` drawn at ``spreads[c]``."""
    return torch.randn(batch, heads, n, D, generator=gen) * spreads


def test_the_balance_is_invisible_to_exact_attention_through_eviction_and_decode(monkeypatch):
    """With rounding taken out, a smoothing layer attends, scores and evicts exactly as the model's
    dtype does: ``(q / s) . ((k - mu) s)`` differs from ``q . k`` by one constant per query."""
    monkeypatch.setattr(kv_format, "round_trip", lambda x, fmt: x)
    gen = torch.Generator().manual_seed(3)
    spreads = torch.linspace(0.2, 6.0, D)
    layers = {}
    for label, fmt in (("exact", None), ("smooth", "int4")):
        monkeypatch.setattr(BudgetedLayer, "smooth_keys", label == "smooth")
        layers[label] = BudgetedLayer([12, 20], EvictionConfig(), fmt)
        layers[label].quantized_storage = False  # the reference store: round_trip, taken out above
    for n in (16, 16, 1, 1):  # chunks and decode steps, every one evicting
        k = _skewed(gen, 2, 2, n, spreads) + 3.0
        q = _skewed(gen, 2, 6, n, spreads.flip(0))
        v = torch.randn(2, 2, n, D, generator=gen)
        exact, smooth = (_attend(layer, q, k, v) for layer in layers.values())
        torch.testing.assert_close(smooth, exact, rtol=0, atol=1e-5)
    a, b = layers.values()
    assert torch.equal(a.positions, b.positions) and torch.equal(a.fill, b.fill)  # the same tokens kept
    assert b.key_scale.std() > 0.1  # a real balance, not ones


def test_the_balance_follows_the_queries_and_cuts_the_logit_error_of_int4_keys():
    """Keys spread widely in channels the queries barely read, narrowly where they read hard: the
    balance gives the second kind the finer steps, and int4's logit error falls."""
    gen = torch.Generator().manual_seed(4)
    spreads = torch.cat([torch.full((D // 4,), 8.0), torch.full((3 * D // 4,), 0.3)])
    reads = torch.cat([torch.full((D // 4,), 0.1), torch.full((3 * D // 4,), 4.0)])
    k = _skewed(gen, 1, 1, 256, spreads)
    q = _skewed(gen, 1, 3, 256, reads)
    centred = k - k.mean(2, keepdim=True)
    s = kv_slots.channel_balance(q, centred)  # [1, 1, D]
    torch.testing.assert_close(s.square().mean(), torch.tensor(1.0))
    ratio = (reads / spreads).sqrt()
    torch.testing.assert_close(s[0, 0] / s[0, 0, 0], ratio / ratio[0], rtol=0.15, atol=0)
    int4 = kv_format.parse("int4")
    exact = q @ centred.transpose(-1, -2)  # [1, 3, 256, 256]: one KV head's logits
    plain = q @ kv_format.round_trip(centred, int4).transpose(-1, -2)
    scaled = (q / s[:, :, None]) @ kv_format.round_trip(centred * s[:, :, None], int4).transpose(-1, -2)
    error = lambda logits: float((logits - exact).square().mean().sqrt())  # noqa: E731
    assert error(scaled) < error(plain) / 2, (error(scaled), error(plain))


def test_a_row_whose_first_step_is_one_token_keeps_a_unit_scale(monkeypatch):
    monkeypatch.setattr(BudgetedLayer, "smooth_keys", True)
    gen = torch.Generator().manual_seed(5)
    layer = BudgetedLayer([8, 8], EvictionConfig(), "int8")
    layer.update(torch.randn(1, 2, 1, D, generator=gen), torch.randn(1, 2, 1, D))
    layer.key_scale.fill_(5.0)  # off the ones it is allocated with, to see the reset
    layer.attend(torch.randn(1, 4, 1, D, generator=gen), None, D**-0.5)
    assert torch.equal(layer.key_scale, torch.ones(1, 2, D))


def test_without_the_balance_every_row_keeps_a_unit_scale(monkeypatch):
    """``balance_keys = False`` (the ablation ``baklava-bench quality --no-balance-keys`` runs):
    keys are centred only, whatever the first step's length."""
    monkeypatch.setattr(BudgetedLayer, "smooth_keys", True)
    monkeypatch.setattr(BudgetedLayer, "balance_keys", False)
    gen = torch.Generator().manual_seed(6)
    layer = BudgetedLayer([8, 8], EvictionConfig(), "int4")
    k = _skewed(gen, 1, 2, 12, torch.linspace(0.2, 6.0, D))
    _attend(layer, torch.randn(1, 4, 12, D, generator=gen), k, torch.randn(1, 2, 12, D))
    assert torch.equal(layer.key_scale, torch.ones(1, 2, D))
    torch.testing.assert_close(layer.key_mean, k.mean(2))
