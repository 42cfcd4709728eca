"""Smoothed keys (``BudgetedLayer.smooth_keys``): quantized keys stored minus their head's mean key.

Attention is blind to what every key of a head shares, so the mean costs nothing exact; what it
buys is quantization error: keys with a large shared offset (Qwen2's k-projection bias) lose
their per-token scale to it. Checked on the CPU: the error attention sees, the mean fixed at a
row's first tokens and carried by pool rows (an engine request alone = beside others).
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from baklava.eviction import EvictionConfig
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
    assert smooth.state_names[-1] == "key_mean" and layers["plain"].key_mean is None
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
    before = layer.key_mean.clone()
    layer.valid_seen[1] = 0  # what SlotPool.reset_row does to row 1
    k = _keys(gen, 2, 2, 3, -7.0)
    _attend(layer, torch.randn(2, 4, 3, D, generator=gen), k, torch.randn(2, 2, 3, D))
    assert torch.equal(layer.key_mean[0], before[0])  # row 0 keeps its mean
    torch.testing.assert_close(layer.key_mean[1], k[1].mean(1))  # row 1 starts again


def test_an_engine_with_smoothed_int8_keys_serves_a_request_alone_as_beside_others(monkeypatch):
    monkeypatch.setattr(BudgetedLayer, "smooth_keys", True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    prompts = _prompts()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    single = _engine(model, 3, kv_format="int8")
    assert single.pool.cache.layers[0].state_names[-1] == "key_mean"
    alone = [single.generate([p], params)[0] for p in prompts]
    together = _engine(model, 3, max_prefill_tokens=32, kv_format="int8").generate(prompts, params)
    assert together == alone
