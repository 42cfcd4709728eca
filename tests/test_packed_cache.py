"""The packed per-head cache against dense references, on a tiny random Llama."""

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from baklava.profiles.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, decode_one_token, enable, prefill

FULL = [[256, 256], [256, 256]]


def ids_and_mask(batch=2, length=20, pad_row=1, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        ids[pad_row, :pad] = 0
        mask[pad_row, :pad] = 0
    return ids, mask


def test_full_budget_generates_exactly_like_dynamic_cache(tiny_llama):
    ids, mask = ids_and_mask()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = tiny_llama.generate(**kw)
    enable(tiny_llama)
    out = tiny_llama.generate(**kw, past_key_values=BudgetedCache(FULL))
    assert torch.equal(ref, out)


def test_full_budget_logits_match_dense(tiny_llama):
    ids, mask = ids_and_mask()
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids, attention_mask=mask).logits
        enable(tiny_llama)
        packed = tiny_llama(input_ids=ids, attention_mask=mask, past_key_values=BudgetedCache(FULL)).logits
    torch.testing.assert_close(packed[0], dense[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, 5:], dense[1, 5:], atol=1e-5, rtol=0)  # padding rows are don't-care


def test_step_api_matches_dense_cache(tiny_llama):
    ids, _ = ids_and_mask(batch=1, pad=0)
    dense_cache = DynamicCache()
    with torch.no_grad():
        ref = [tiny_llama(input_ids=ids, past_key_values=dense_cache).logits[:, -1]]
        for t in (5, 7, 9):
            ref.append(tiny_llama(input_ids=torch.tensor([[t]]), past_key_values=dense_cache).logits[:, -1])
    cache = BudgetedCache(FULL)
    got = [prefill(tiny_llama, cache, ids)] + [
        decode_one_token(tiny_llama, cache, torch.tensor([[t]])) for t in (5, 7, 9)
    ]
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_allocated_bytes_equal_sum_of_capacities(tiny_llama, batch):
    caps = np.array([[7, 30], [12, 1]])
    cache = BudgetedCache(caps)
    enable(tiny_llama)
    ids, mask = ids_and_mask(batch=batch, length=40, pad_row=batch - 1)
    tiny_llama.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
    )
    head_dim, dtype_bytes = 16, 4
    expected = int(caps.sum()) * 2 * head_dim * dtype_bytes * batch
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert measured == expected == cache.kv_bytes()
    fills = cache.fill_levels()  # [L, B, H]
    assert (fills <= torch.as_tensor(caps)[:, None, :]).all()
    assert (fills[:, 0] == torch.as_tensor(caps)).all()  # 50 tokens seen > every capacity: all full


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_sink_and_window_always_kept(tiny_llama, policy):
    ev = EvictionConfig(sink=3, window=5, policy=policy)
    cache = BudgetedCache([[12, 20], [9, 16]], ev)
    enable(tiny_llama)
    ids, _ = ids_and_mask(batch=1, length=50, pad=0)
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=cache)
        for t in range(6):
            tiny_llama(input_ids=torch.tensor([[10 + t]]), past_key_values=cache)
    seen = 56
    for layer in cache.layers:
        for h in range(2):
            pos = set(layer.head_positions(h).tolist())
            assert {0, 1, 2} <= pos
            assert set(range(seen - 5, seen)) <= pos
            assert len(pos) == layer.capacities[h]
            assert layer.head_positions(h).tolist() == sorted(pos)  # slots stay in arrival order
            if policy == "ring":
                assert pos == {0, 1, 2} | set(range(seen - layer.capacities[h] + 3, seen))


def test_capacity_one_keeps_only_the_newest_token(tiny_llama):
    cache = BudgetedCache([[1, 1], [1, 1]], EvictionConfig(sink=0, window=1))
    enable(tiny_llama)
    ids, _ = ids_and_mask(batch=1, length=12, pad=0)
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=cache)
        tiny_llama(input_ids=torch.tensor([[4]]), past_key_values=cache)
    assert all(layer.head_positions(h).tolist() == [12] for layer in cache.layers for h in range(2))


def _oracle_attention(state):
    """Eager attention over a dense cache; once ``state["keep"]`` is set, head h of layer l only
    sees ``keep[l][:, h]`` (before that: plain causal attention)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        group = query.shape[1] // key.shape[1]
        logits = (query @ key.repeat_interleave(group, 1).transpose(-1, -2)) * scaling
        logits = logits + attention_mask[..., : key.shape[-2]]
        if state["keep"] is not None:
            allowed = state["keep"][module.layer_idx].repeat_interleave(group, dim=1)  # [B, H_q, S]
            logits = logits.masked_fill(~allowed[:, :, None, :], float("-inf"))
        out = torch.softmax(logits, -1) @ value.repeat_interleave(group, 1)
        return out.transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_decode_step_equals_masked_dense_attention(tiny_llama, policy):
    """After an evicting prefill, one decode step equals dense attention restricted to the kept tokens."""
    ev = EvictionConfig(sink=2, window=4, policy=policy, obs_window=8)
    caps = [[9, 14], [11, 6]]
    ids, _ = ids_and_mask(batch=2, length=30, pad=0, seed=3)
    nxt = torch.tensor([[7], [8]])
    enable(tiny_llama)
    cache = BudgetedCache(caps, ev)
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=cache)
        keep = []
        for layer in cache.layers:  # kept positions per row and head, plus the new token (position 30)
            k = torch.zeros(2, 2, 31, dtype=torch.bool)
            for b in range(2):
                for h in range(2):
                    off = layer.offsets[h]
                    k[b, h, layer.positions[b, off : off + int(layer.fill[b, h])]] = True
            k[:, :, 30] = True
            keep.append(k)
        got = tiny_llama(input_ids=nxt, past_key_values=cache).logits

        state = {"keep": None}
        AttentionInterface.register("oracle", _oracle_attention(state))
        AttentionMaskInterface.register("oracle", eager_mask)
        tiny_llama.set_attn_implementation("oracle")
        dense = DynamicCache()
        tiny_llama(input_ids=ids, past_key_values=dense)  # prefill: every token sees the whole prompt
        state["keep"] = keep
        want = tiny_llama(input_ids=nxt, past_key_values=dense).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prefill_keeps_the_keys_of_the_dense_cache(tiny_llama):
    """Keys are cached after RoPE: every kept slot holds exactly the dense cache's key at its position."""
    ids, _ = ids_and_mask(batch=1, length=40, pad=0, seed=1)
    dense = DynamicCache()
    enable(tiny_llama)
    cache = BudgetedCache([[10, 17], [13, 8]])
    with torch.no_grad():
        tiny_llama(input_ids=ids, past_key_values=dense)
        tiny_llama(input_ids=ids, past_key_values=cache)
    for li, layer in enumerate(cache.layers):
        for h in range(2):
            pos = layer.head_positions(h)
            torch.testing.assert_close(
                layer.head_keys(h), dense.layers[li].keys[0, h, pos], atol=1e-6, rtol=0
            )


def test_batch_rows_do_not_leak_into_each_other(tiny_llama):
    enable(tiny_llama)
    caps = [[10, 16], [12, 7]]
    prompts = [torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (25, 18)]
    alone = []
    for p in prompts:
        out = tiny_llama.generate(
            input_ids=p,
            past_key_values=BudgetedCache(caps),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
        alone.append(out[0, p.shape[1] :])
    ids = torch.zeros(2, 25, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 25 - p.shape[1] :] = p[0]
        mask[i, 25 - p.shape[1] :] = 1
    out = tiny_llama.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=BudgetedCache(caps),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
    )
    for i in range(2):
        assert out[i, 25:].tolist() == alone[i].tolist()


def test_model_without_baklava_attention_fails_loudly(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    cache = BudgetedCache(FULL)
    with torch.no_grad(), pytest.raises(RuntimeError, match="attn_implementation='baklava'"):
        tiny_llama(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache)


def test_from_profile_rejects_other_model(tiny_llama):
    from baklava.errors import ProfileError
    from baklava.profiles.head_scores import HeadScores
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from tests.conftest import tiny_config

    other = ModelInfo.from_config(tiny_config(intermediate_size=256), "other")
    profile = BudgetProfile(other, HeadScores.constant(2, 2), capacities=np.full((2, 2), 8))
    with pytest.raises(ProfileError, match="made for model 'other'"):
        BudgetedCache.from_profile(profile, model=tiny_llama)
