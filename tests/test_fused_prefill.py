"""The fused prefill-chunk layer forward (runtime/fused_prefill.py) and its kernels against eager.

Without CUDA the kernels run in Triton's interpreter on the CPU (float32): the fused chunk must
match transformers' own layer up to float32 rounding; on CUDA in bfloat16, up to bf16 rounding.
The model tests compare what a user gets: the logits of a prefill through an evicting budgeted
cache, the slots it keeps, and the decode steps after it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baklava.eviction import EvictionConfig
from baklava.kernels.prefill_attention import observation_masses
from baklava.kernels.prefill_layer import rms_norm, rope_heads, silu_gate
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.fused_decode import fuse
from baklava.runtime.packed_cache import BudgetedLayer
from baklava.runtime.prefill_attention import causal_self_attention_lse, observation_mass

from .test_fused_decode import _llama_tiny, _qwen2_tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = dict(rtol=2e-2, atol=2e-2) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-5)


def _eager_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("hidden", [64, 200], ids=["pow2", "ragged"])
def test_rms_norm_and_silu_gate_round_like_eager(hidden):
    torch.manual_seed(0)
    x = torch.randn(2, 37, hidden, device=DEVICE, dtype=DTYPE) * 3
    w = torch.rand(hidden, device=DEVICE, dtype=DTYPE) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), _eager_norm(x, w, 1e-6), **TOL)
    gate_up = torch.randn(2, 37, 2 * hidden, device=DEVICE, dtype=DTYPE) * 2
    gate, up = gate_up.split(hidden, -1)
    act = silu_gate(gate_up)
    assert act.shape == (2, 37, hidden)
    torch.testing.assert_close(act, F.silu(gate) * up, **TOL)


@pytest.mark.parametrize("shared_angles", [True, False], ids=["one-row-of-angles", "angles-per-row"])
def test_rope_heads_rotates_q_and_k_and_lays_out_heads(shared_angles):
    """q, k rotated as transformers' apply_rotary_pos_emb, v copied; all ``[B, H, S, D]``
    contiguous; a chunk longer than a program's block of tokens."""
    torch.manual_seed(0)
    batch, s, q_heads, kv_heads, d = 2, 70, 4, 2, 16
    qkv = torch.randn(batch, s, (q_heads + 2 * kv_heads) * d, device=DEVICE, dtype=DTYPE)
    angle = torch.randn(1 if shared_angles else batch, s, d // 2, device=DEVICE)
    cos = torch.cat([angle.cos()] * 2, -1).to(DTYPE)
    sin = torch.cat([angle.sin()] * 2, -1).to(DTYPE)
    q, k, v = rope_heads(qkv, cos, sin, q_heads, kv_heads, d)
    heads = qkv.view(batch, s, q_heads + 2 * kv_heads, d).transpose(1, 2)  # [B, H, S, D]

    def rotate(t):
        rot = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)
        return t * cos[:, None] + rot * sin[:, None]

    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(q, rotate(heads[:, :q_heads]), **TOL)
    torch.testing.assert_close(k, rotate(heads[:, q_heads : q_heads + kv_heads]), **TOL)
    assert torch.equal(v, heads[:, q_heads + kv_heads :])


def _pair(make):
    ref = make().to(DEVICE, DTYPE)
    fused = copy.deepcopy(ref)
    for m in (ref, fused):
        enable(m)
    assert fuse(fused, device_types=(DEVICE,))
    return ref, fused


def _count_original_calls(model) -> list[int]:
    """Calls of the layers' original (transformers) forward, counted from here on."""
    calls = [0]
    for layer in model.model.layers:
        original = layer._baklava_fused.original

        def counted(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        layer._baklava_fused.original = counted
    return calls


@pytest.mark.parametrize("make", [_llama_tiny, _qwen2_tiny], ids=["llama", "qwen2-bias"])
def test_fused_chunks_match_the_original_forward(make):
    """Two chunks of a prompt (the second evicts) through a budgeted cache: every chunk's logits,
    then decode steps, and the kept slots agree with transformers' layers; the fused model never
    runs them."""
    ref, fused = _pair(make)
    calls = _count_original_calls(fused)
    ids = torch.randint(3, 96, (2, 52), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    caches = [BudgetedCache(np.array([[24, 30], [18, 40]]), EvictionConfig()) for _ in range(2)]
    with torch.inference_mode():
        for part in (ids[:, :20], ids[:, 20:]):
            a = ref(input_ids=part, **forward_cache(ref, caches[0])).logits.float()
            b = fused(input_ids=part, **forward_cache(fused, caches[1])).logits.float()
            torch.testing.assert_close(b, a, **TOL)
        token = a[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            a = ref(input_ids=token, **forward_cache(ref, caches[0])).logits[:, -1].float()
            b = fused(input_ids=token, **forward_cache(fused, caches[1])).logits[:, -1].float()
            torch.testing.assert_close(b, a, **TOL)
            token = a.argmax(-1, keepdim=True)
    assert calls[0] == 0
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.fill, lb.fill)
        same = la.positions == lb.positions  # [B, C]
        if DEVICE == "cpu":
            assert bool(same.all())
        else:  # bf16 rounding may flip near-tied SnapKV scores (a random tiny model has many)
            live = la.positions >= 0
            assert float((same & live).sum() / live.sum()) >= 0.8
        torch.testing.assert_close(lb.keys[same], la.keys[same], **TOL)
        torch.testing.assert_close(lb.values[same], la.values[same], **TOL)


def test_padded_batches_and_plain_forwards_take_the_fused_chunk_too():
    """A left-padded batch (the attention mask goes to the attention as before) and a forward
    without any cache give transformers' logits on the real tokens."""
    ref, fused = _pair(_llama_tiny)
    calls = _count_original_calls(fused)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    caps = np.array([[12, 9], [7, 16]])
    with torch.inference_mode():
        a = ref(input_ids=ids, attention_mask=mask, **forward_cache(ref, BudgetedCache(caps))).logits
        b = fused(input_ids=ids, attention_mask=mask, **forward_cache(fused, BudgetedCache(caps))).logits
        torch.testing.assert_close(b[0, 5:].float(), a[0, 5:].float(), **TOL)
        torch.testing.assert_close(b[1].float(), a[1].float(), **TOL)
        torch.testing.assert_close(
            fused(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float(), **TOL
        )
    assert calls[0] == 0


def test_prefill_off_keeps_transformers_chunk_forward():
    """``fuse(..., prefill=False)``: one-token steps fused, chunks through the original forward
    (bit-identical logits); calling fuse again switches the chunk forward back on."""
    ref, fused = _pair(_llama_tiny)
    fuse(fused, device_types=(DEVICE,), prefill=False)
    calls = _count_original_calls(fused)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.inference_mode():
        assert torch.equal(fused(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert calls[0] == len(fused.model.layers)
        fuse(fused, device_types=(DEVICE,))
        fused(input_ids=ids)
    assert calls[0] == len(fused.model.layers)


def test_first_chunk_masses_from_a_log_sum_exp_match_observation_mass():
    """The GPU's first chunk scores its tokens with the mass kernel from flash's log-sum-exp
    (nothing stored: fill 0, no stored candidates); the same masses as SnapKV's PyTorch
    observation_mass, and no stored score touched."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, group, s, d, obs = 2, 2, 3, 45, 32, 8
    rand = lambda *shape: torch.randn(*shape, generator=gen).half().to(DEVICE)  # noqa: E731
    layer = BudgetedLayer([40, 24], EvictionConfig())
    empty = torch.empty(batch, heads, 0, d, dtype=torch.float16, device=DEVICE)
    layer.lazy_initialization(empty, empty)
    query, k_new = rand(batch, heads * group, s, d), rand(batch, heads, s, d)
    scale = d**-0.5
    logits = query.float() @ k_new.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    causal = torch.ones(s, s, dtype=torch.bool, device=DEVICE).tril()
    lse = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1)  # what flash returns
    if DEVICE == "cuda":  # and does return, in this layout
        flash_lse = causal_self_attention_lse(query, k_new, k_new, scale)[1]
        assert flash_lse is not None
        torch.testing.assert_close(flash_lse, lse, atol=2e-3, rtol=0)
    scores = torch.rand(batch, layer.total, generator=gen).to(DEVICE)
    before = scores.clone()
    got = observation_masses(
        query, layer.keys, k_new, layer.fill, layer.device_offsets, lse, scores, 0, obs, scale
    )
    want = observation_mass(query, k_new, 0, obs, scale)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert float(got.sum()) == pytest.approx(batch * heads * obs, rel=1e-3)  # each query pays 1 in all
    assert torch.equal(scores, before)
