"""The Triton decode step (attention + cache update) against the per-head reference loop.

A cache is prefilled once, copied, and both copies take the same decode steps: the reference
through ``BudgetedLayer``'s per-head loop (arrival order, the oracle), the other through the
kernels (``decode_kernels = "triton"``). After every step the outputs must agree and every head
must hold the same tokens: the same positions, keys, values and scores, compared as sets sorted
by position, since the kernel overwrites the evicted slot instead of shifting (its contract).

Runs on a CUDA device, or in Triton's interpreter on the CPU (fp16; the interpreter has no bf16).
"""

import copy

import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.kv_format import parse
from baklava.kv_format import round_trip as kv_round_trip
from baklava.runtime.packed_cache import BudgetedLayer
from tests.triton_env import DEVICE

pytest.importorskip("triton", reason="Triton is not installed")

HEAD_DIM = 64


def _prefilled(caps, batch, q_heads, prompt, eviction, seed, pad=None, kv_format=None):
    gen = torch.Generator().manual_seed(seed)
    kv = len(caps)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    layer = BudgetedLayer(caps, eviction, kv_format)
    mask = None
    if pad is not None:  # left padding: row b's first pad[b] tokens are padding
        keep = torch.arange(prompt)[None, :] >= torch.tensor(pad)[:, None]  # [B, S]
        causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()
        mask = (causal[None] & keep[:, None, :])[:, None].to(DEVICE)  # [B, 1, S, S]
    layer.update(rand(batch, kv, prompt, HEAD_DIM), rand(batch, kv, prompt, HEAD_DIM))
    layer.attend(rand(batch, q_heads, prompt, HEAD_DIM), mask, HEAD_DIM**-0.5)
    return layer, gen


def _step(layer, query, k, v, mask):
    layer.update(k, v)
    return layer.attend(query, mask, HEAD_DIM**-0.5)[0]  # [B, 1, H_q, D]


def _assert_same_tokens(ref: BudgetedLayer, got: BudgetedLayer, where: str, score_rtol: float = 1e-4):
    assert torch.equal(ref.fill, got.fill), where
    assert torch.equal(ref.valid_seen, got.valid_seen), where
    for b in range(ref.batch_size):
        for h, off in enumerate(ref.offsets):
            n = int(ref.fill[b, h])
            rs, gs = slice(off, off + n), slice(off, off + n)
            order = got.positions[b, gs].argsort()
            msg = f"{where}, row {b}, head {h}"
            assert torch.equal(ref.positions[b, rs], got.positions[b, gs][order]), msg
            for name in ref.slot_names:  # keys, values (+ their scales: quantized slots, byte for byte)
                assert torch.equal(getattr(ref, name)[b, rs], getattr(got, name)[b, gs][order]), (
                    f"{msg}, {name}"
                )
            torch.testing.assert_close(
                ref.scores[b, rs], got.scores[b, gs][order], atol=2e-6, rtol=score_rtol, msg=msg
            )


@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize(
    ("caps", "batch", "q_heads", "prompt", "pad"),
    [
        ([1, 5, 64], 2, 6, 40, None),  # capacity 1; one head full, one with room
        ([3, 17, 9, 100], 3, 8, 30, [0, 7, 29]),  # GQA 2, rows with different fill levels
        ([24, 24], 1, 6, 24, None),  # full from the start: every step evicts
        ([200, 5], 2, 4, 210, [0, 3]),  # a full head over several tiles: the victim is found across tiles
    ],
)
def test_decode_steps_keep_what_the_reference_keeps(
    policy, caps, batch, q_heads, prompt, pad, kv_format=None
):
    eviction = EvictionConfig(sink=2, window=3, policy=policy)
    seed = len(caps) + batch
    ref, gen = _prefilled(caps, batch, q_heads, prompt, eviction, seed=seed, pad=pad, kv_format=kv_format)
    ref.decode_kernels, ref.vectorized_decode = "torch", False
    got = copy.deepcopy(ref)
    got.decode_kernels, got.vectorized_decode = "triton", True  # the kernels' decode step
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    evicted = 0
    for step in range(12):
        q, k, v = (
            rand(batch, q_heads, 1, HEAD_DIM),
            rand(batch, len(caps), 1, HEAD_DIM),
            rand(batch, len(caps), 1, HEAD_DIM),
        )
        before = ref.fill.clone()
        want, out = _step(ref, q, k, v, None), _step(got, q, k, v, None)
        # quantized slots: the kernel scales payload in fp32, the reference reads fp16 dequantized values
        tol = 2e-3 if kv_format is None else 1e-2
        torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol, msg=f"step {step}")
        # quantized slots: the kernel's logits come from float16 (H2O scores within 1e-3 of the reference's)
        _assert_same_tokens(ref, got, f"step {step}", 1e-4 if kv_format is None else 1e-3)
        evicted += int((ref.fill == before).sum())
    assert evicted > 0  # the case really evicts


@pytest.mark.parametrize(("kv_format", "policy"), [("int8", "h2o"), ("fp8", "h2o"), ("int4", "ring")])
def test_quantized_slots_keep_what_the_reference_keeps(kv_format, policy):
    """Payload + scales through the kernels (attention reads them, the update writes the step's
    quantized token) against the one-token reference over the same quantized slots."""
    test_decode_steps_keep_what_the_reference_keeps(policy, [3, 17, 9, 100], 3, 8, 30, [0, 7, 29], kv_format)


@pytest.mark.parametrize("kv_format", [None, "int8"])
def test_padding_rows_change_nothing(kv_format):
    eviction = EvictionConfig(sink=1, window=1, policy="h2o")
    ref, gen = _prefilled([4, 8], 2, 4, 10, eviction, seed=3, kv_format=kv_format)
    ref.decode_kernels, ref.vectorized_decode = "torch", False
    got = copy.deepcopy(ref)
    got.decode_kernels, got.vectorized_decode = "triton", True  # the kernels' decode step
    q, k, v = (torch.randn(2, n, 1, HEAD_DIM, generator=gen).half().to(DEVICE) for n in (4, 2, 2))
    mask = (
        torch.tensor([0.0, torch.finfo(torch.float16).min]).half().view(2, 1, 1, 1).to(DEVICE)
    )  # row 1 pads
    row1 = {name: getattr(got, name)[1].clone() for name in ("keys", "values", "positions", "scores", "fill")}
    want, out = _step(ref, q, k, v, mask), _step(got, q, k, v, mask)
    torch.testing.assert_close(out[0].float(), want[0].float(), atol=2e-3, rtol=2e-3)
    _assert_same_tokens(ref, got, "padding step")
    for name, saved in row1.items():
        assert torch.equal(getattr(got, name)[1], saved), name
    # nor does the kernel read its slots (a slot pool's idle rows cost no bandwidth): the row
    # attends to the step's token alone, so each query head gets its KV head's value back
    v_read = kv_round_trip(v.float(), parse(kv_format)).half()  # as the step's token is attended
    torch.testing.assert_close(out[1, 0].float(), v_read[1, [0, 0, 1, 1], 0].float(), atol=1e-3, rtol=1e-3)
    assert not torch.allclose(want[1, 0].float(), out[1, 0].float(), atol=1e-2)  # the reference reads them


def test_ties_drop_the_newest_token():
    # A zero query gives every slot the same attention, so all scored tokens tie; the newest of
    # the lowest goes first, which here is the new token itself: nothing changes but the scores.
    eviction = EvictionConfig(sink=0, window=0, policy="h2o")
    layer, gen = _prefilled([6], 1, 2, 6, eviction, seed=0)
    layer.scores.zero_()
    layer.decode_kernels = "triton"
    positions = layer.positions.clone()
    q = torch.zeros(1, 2, 1, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(1, 1, 1, HEAD_DIM, generator=gen).half().to(DEVICE) for _ in range(2))
    _step(layer, q, k, v, None)
    assert torch.equal(layer.positions, positions)
    torch.testing.assert_close(layer.scores, torch.full_like(layer.scores, 1 / 7))
    # ring: the oldest body token is replaced by the new one, in its slot
    ring, gen = _prefilled([6], 1, 2, 6, EvictionConfig(sink=1, window=0, policy="ring"), seed=0)
    ring.decode_kernels = "triton"
    _step(ring, q, k, v, None)
    assert ring.positions[0].tolist() == [0, 6, 2, 3, 4, 5]
    assert torch.equal(ring.keys[0, 1], k[0, 0, 0])
