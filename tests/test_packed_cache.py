"""The packed per-head cache against dense references, on a tiny random Llama."""

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from baklava.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, decode_one_token, enable, prefill
from baklava.runtime.cache_keyword import forward_cache, generate_cache

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
    out = tiny_llama.generate(**kw, **generate_cache(tiny_llama, BudgetedCache(FULL)))
    assert torch.equal(ref, out)


def test_full_budget_logits_match_dense(tiny_llama):
    ids, mask = ids_and_mask()
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids, attention_mask=mask).logits
        enable(tiny_llama)
        packed = tiny_llama(
            input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, BudgetedCache(FULL))
        ).logits
    torch.testing.assert_close(packed[0], dense[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, 5:], dense[1, 5:], atol=1e-5, rtol=0)  # padding rows are don't-care


def test_step_api_matches_dense_cache(tiny_llama):
    ids, _ = ids_and_mask(batch=1, pad=0)
    dense_cache = DynamicCache()
    with torch.no_grad():
        ref = [tiny_llama(input_ids=ids, **forward_cache(tiny_llama, dense_cache)).logits[:, -1]]
        for t in (5, 7, 9):
            ref.append(
                tiny_llama(input_ids=torch.tensor([[t]]), **forward_cache(tiny_llama, dense_cache)).logits[
                    :, -1
                ]
            )
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
        **generate_cache(tiny_llama, cache),
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
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, cache))
        for t in range(6):
            tiny_llama(input_ids=torch.tensor([[10 + t]]), **forward_cache(tiny_llama, cache))
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
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, cache))
        tiny_llama(input_ids=torch.tensor([[4]]), **forward_cache(tiny_llama, cache))
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
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, cache))
        keep = []
        for layer in cache.layers:  # kept positions per row and head, plus the new token (position 30)
            k = torch.zeros(2, 2, 31, dtype=torch.bool)
            for b in range(2):
                for h in range(2):
                    off = layer.offsets[h]
                    k[b, h, layer.positions[b, off : off + int(layer.fill[b, h])]] = True
            k[:, :, 30] = True
            keep.append(k)
        got = tiny_llama(input_ids=nxt, **forward_cache(tiny_llama, cache)).logits

        state = {"keep": None}
        AttentionInterface.register("oracle", _oracle_attention(state))
        AttentionMaskInterface.register("oracle", eager_mask)
        tiny_llama.set_attn_implementation("oracle")
        dense = DynamicCache()
        tiny_llama(
            input_ids=ids, **forward_cache(tiny_llama, dense)
        )  # prefill: every token sees the whole prompt
        state["keep"] = keep
        want = tiny_llama(input_ids=nxt, **forward_cache(tiny_llama, dense)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prefill_keeps_the_keys_of_the_dense_cache(tiny_llama):
    """Keys are cached after RoPE: every kept slot holds exactly the dense cache's key at its position."""
    ids, _ = ids_and_mask(batch=1, length=40, pad=0, seed=1)
    dense = DynamicCache()
    enable(tiny_llama)
    cache = BudgetedCache([[10, 17], [13, 8]])
    with torch.no_grad():
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, dense))
        tiny_llama(input_ids=ids, **forward_cache(tiny_llama, cache))
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
            **generate_cache(tiny_llama, BudgetedCache(caps)),
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
        **generate_cache(tiny_llama, BudgetedCache(caps)),
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
        tiny_llama(input_ids=torch.tensor([[5, 6, 7]]), **forward_cache(tiny_llama, cache))


def test_from_profile_rejects_other_model(tiny_llama):
    from baklava.errors import ProfileError
    from baklava.profiles.head_scores import HeadScores
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from tests.conftest import tiny_config

    other = ModelInfo.from_config(tiny_config(intermediate_size=256), "other")
    profile = BudgetProfile(other, HeadScores.constant(2, 2), capacities=np.full((2, 2), 8))
    with pytest.raises(ProfileError, match="made for model 'other'"):
        BudgetedCache.from_profile(profile, model=tiny_llama)


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_compressing_a_full_prefill_equals_prefilling_into_the_budget(tiny_llama, policy):
    """One full prefill serves every budget: compressed() keeps exactly what a direct prefill keeps."""
    enable(tiny_llama)
    ids, mask = ids_and_mask(length=40, pad=7)
    ev = EvictionConfig(sink=2, window=4, policy=policy, obs_window=5, pool_kernel=3)
    caps = [[9, 1], [14, 6]]
    direct = BudgetedCache(caps, ev)
    full = BudgetedCache(FULL, ev)
    with torch.no_grad():
        tiny_llama(input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, direct))
        tiny_llama(input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, full))
    before = full.layers[0].keys.clone()
    cut = full.compressed(caps)
    assert torch.equal(full.layers[0].keys, before)  # the source cache is untouched
    assert cut.kv_bytes() == direct.kv_bytes()
    for a, b in zip(cut.layers, direct.layers, strict=True):
        assert torch.equal(a.fill, b.fill) and a.seen == b.seen and torch.equal(a.valid_seen, b.valid_seen)
        for h in range(2):
            for row in range(2):
                assert torch.equal(a.head_positions(h, row), b.head_positions(h, row))
                assert torch.equal(a.head_keys(h, row), b.head_keys(h, row))
    # and decoding goes on identically, eviction included
    grown = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    token = torch.tensor([[5], [9]])
    for _ in range(6):
        with torch.no_grad():
            want = tiny_llama(
                input_ids=token, attention_mask=grown, **forward_cache(tiny_llama, direct)
            ).logits
            got = tiny_llama(input_ids=token, attention_mask=grown, **forward_cache(tiny_llama, cut)).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        token = want[:, -1].argmax(-1, keepdim=True)
        grown = torch.cat([grown, torch.ones(2, 1, dtype=mask.dtype)], 1)


def test_compressing_into_more_room_copies_everything(tiny_llama):
    enable(tiny_llama)
    ids, mask = ids_and_mask(length=20, pad=3)
    full = BudgetedCache(FULL)
    with torch.no_grad():
        tiny_llama(input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, full))
    copy = full.compressed([[30, 30], [30, 30]])
    assert torch.equal(copy.fill_levels(), full.fill_levels())
    assert copy.kv_bytes() == 2 * 2 * 60 * 2 * 16 * 4  # layers x batch x sum(cap) x K,V x D x fp32
    for a, b in zip(copy.layers, full.layers, strict=True):
        assert torch.equal(a.head_keys(1, 1), b.head_keys(1, 1))
    with pytest.raises(ValueError, match="capacities for 3 layers"):
        full.compressed([[4, 4]] * 3)


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_vectorized_decode_matches_the_per_head_loop(policy, monkeypatch):
    """The one-token fast path keeps the same tokens in the same slots as the reference loop."""
    from transformers import LlamaForCausalLM

    from baklava.runtime.packed_cache import BudgetedLayer
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_attention_heads=8, num_key_value_heads=4)).eval()  # GQA 2
    enable(model)
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    caps = [[1, 7, 12, 30], [9, 3, 16, 5]]  # capacity 1, rows fill up at different steps
    ids, mask = ids_and_mask(length=14, pad=6)
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(BudgetedLayer, "vectorized_decode", fast)
        cache, grown, token, logits = BudgetedCache(caps, ev), mask, torch.tensor([[5], [9]]), []
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **forward_cache(model, cache))
            for step in range(24):
                grown = torch.cat([grown, torch.ones(2, 1, dtype=mask.dtype)], 1)
                if step == 5:
                    grown[1, -1] = 0  # a padding token in the middle of decoding
                out = model(input_ids=token, attention_mask=grown, **forward_cache(model, cache)).logits[
                    :, -1
                ]
                logits.append(out)
                token = out.argmax(-1, keepdim=True)
        runs[fast] = (cache, torch.stack(logits))
    (ref, ref_logits), (fast, fast_logits) = runs[False], runs[True]
    torch.testing.assert_close(fast_logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(fast.fill_levels(), ref.fill_levels())
    for a, b in zip(fast.layers, ref.layers, strict=True):
        assert torch.equal(a.valid_seen, b.valid_seen)
        for h in range(4):
            for row in range(2):
                assert torch.equal(a.head_positions(h, row), b.head_positions(h, row)), (h, row)
                # keys of layer 1 carry layer 0's float rounding (fp32 softmax vs SDPA)
                torch.testing.assert_close(a.head_keys(h, row), b.head_keys(h, row), rtol=0, atol=1e-5)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    evicted = sum(int(layer.valid_seen.max()) - int(layer.fill[0].min()) for layer in ref.layers)
    assert evicted > 0  # the comparison covered eviction, not only appends


def test_chunked_prefill_bounds_the_attended_keys_by_budget_plus_chunk(tiny_llama, monkeypatch):
    from baklava.runtime import prefill_attention

    enable(tiny_llama)
    ids = torch.randint(3, 96, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one_pass = prefill(tiny_llama, BudgetedCache(FULL), ids)
        chunked = prefill(tiny_llama, BudgetedCache(FULL), ids, chunk=16)
    torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-5)  # nothing evicted: exact attention

    seen_keys = []
    real = prefill_attention.causal_attention

    def spy(q, k, v, past, scale):
        seen_keys.append(k.shape[2])
        return real(q, k, v, past, scale)

    monkeypatch.setattr(prefill_attention, "causal_attention", spy)
    caps = [[12, 20], [8, 24]]
    prefill(tiny_llama, BudgetedCache(caps), ids, chunk=16)
    assert max(seen_keys) <= 24 + 16  # the largest head's capacity plus one chunk
    seen_keys.clear()
    prefill(tiny_llama, BudgetedCache(caps), ids)
    assert max(seen_keys) == 90  # one pass attends over the whole prompt


@pytest.mark.parametrize("device,route", [("cpu", "sdpa"), ("cuda", "flash"), ("cuda", "sdpa")])
def test_first_chunk_attention_matches_fp32_causal_gqa(device, route, monkeypatch):
    """A first chunk's causal GQA attention (14 query heads over 2 KV heads, Qwen2.5-0.5B's)
    against fp32 softmax attention; on CUDA in bf16 through flash attention, whose route the
    engine's prompts must take (SDPA's own cuDNN choice builds a plan per new length), and
    through SDPA's choice past ``FLASH_MAX_FLOPS``."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    from baklava.runtime import prefill_attention
    from baklava.runtime.prefill_attention import causal_self_attention

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if route == "sdpa":
        monkeypatch.setattr(prefill_attention, "FLASH_MAX_FLOPS", 0.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, 14, 777, 64, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(1, 2, 777, 64, device=device, dtype=dtype, generator=gen) for _ in range(2))
    if route == "flash":
        assert can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, True, True))
    out = causal_self_attention(q, k, v, 0.125)
    kf, vf = (t.float().repeat_interleave(7, dim=1) for t in (k, v))
    logits = (q.float() @ kf.transpose(-1, -2)) * 0.125
    logits = logits.masked_fill(~torch.ones(777, 777, dtype=torch.bool, device=device).tril(), float("-inf"))
    expected = torch.softmax(logits, -1) @ vf
    assert out.shape == (1, 14, 777, 64) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2 if device == "cuda" else 1e-5)


def test_query_blocks_give_the_same_prefill(tiny_llama, monkeypatch):
    """Long prefills attend QUERY_BLOCK queries at a time, building each block's bias on the fly
    (no [B, 1, q, n + q] tensor): the logits and the kept tokens do not depend on the block size."""
    from baklava.runtime import prefill_attention

    enable(tiny_llama)
    ids = torch.randint(3, 96, (2, 23), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    caps = np.array([[4, 9], [16, 2]])
    runs = []
    for block in (2048, 5):
        monkeypatch.setattr(prefill_attention, "QUERY_BLOCK", block)
        cache = BudgetedCache(caps)
        with torch.inference_mode():
            first = tiny_llama(
                input_ids=ids[:, :15], attention_mask=mask[:, :15], **forward_cache(tiny_llama, cache)
            ).logits
            second = tiny_llama(
                input_ids=ids[:, 15:], attention_mask=mask, **forward_cache(tiny_llama, cache)
            ).logits
        runs.append((first, second, cache))
    (f1, s1, c1), (f2, s2, c2) = runs
    torch.testing.assert_close(f1[0], f2[0])
    torch.testing.assert_close(f1[1, 6:], f2[1, 6:])  # padding rows attend to nothing: compare real tokens
    torch.testing.assert_close(s1, s2)
    for a, b in zip(c1.layers, c2.layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.fill, b.fill)


@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("room", [False, True])
def test_unpadded_prefill_matches_the_biased_per_head_path(policy, chunk, room, monkeypatch):
    """Chunks without padding skip the bias (SDPA's causal kernels, one call per layer for the first
    chunk, SnapKV masses from the observation window alone): same logits, same kept tokens, same
    scores as the per-head biased path, with heads evicting in the middle of the prompt."""
    from transformers import LlamaForCausalLM

    from baklava.runtime import prefill_attention
    from baklava.runtime.packed_cache import BudgetedLayer
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_attention_heads=8, num_key_value_heads=4)).eval()  # GQA 2
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    # room: every head holds the prompt, so every chunk is appended in place (append_chunk)
    caps = [[26, 30, 27, 40], [25, 33, 26, 28]] if room else [[1, 7, 12, 30], [9, 3, 16, 5]]
    ids = torch.randint(3, 96, (2, 25), generator=torch.Generator().manual_seed(5))
    calls, appends = [], []
    real, real_append = prefill_attention.unpadded_chunk, prefill_attention.append_chunk
    monkeypatch.setattr(prefill_attention, "unpadded_chunk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(prefill_attention, "append_chunk", lambda *a: appends.append(1) or real_append(*a))
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(BudgetedLayer, "unpadded_prefill", fast)
        cache = BudgetedCache(caps, ev)
        with torch.inference_mode():
            logits = prefill(model, cache, ids, chunk=chunk)
            after = decode_one_token(model, cache, logits.argmax(-1, keepdim=True))
        runs[fast] = (cache, logits, after)
    assert len(calls) == 2 * (1 if chunk is None else 4)  # the fast run took it, every layer and chunk
    assert len(appends) == (len(calls) if room else 0)  # without room some head evicts every chunk
    (ref, ref_logits, ref_after), (got, got_logits, got_after) = runs[False], runs[True]
    torch.testing.assert_close(got_logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_after, ref_after, rtol=0, atol=1e-5)
    assert torch.equal(got.fill_levels(), ref.fill_levels())
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.valid_seen, b.valid_seen)
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    if not room:
        assert int(ref.layers[0].fill[0, 0]) == 1 < 25  # heads evicted during the prefill


def test_padded_prompts_keep_the_biased_path(tiny_llama, monkeypatch):
    """Any padding token means an explicit mask and the per-row biased path."""
    from baklava.runtime import prefill_attention

    calls = []
    real = prefill_attention.unpadded_chunk
    monkeypatch.setattr(prefill_attention, "unpadded_chunk", lambda *a: calls.append(1) or real(*a))
    enable(tiny_llama)
    ids, mask = ids_and_mask(pad=3)
    with torch.inference_mode():
        tiny_llama(
            input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, BudgetedCache([[5, 9], [16, 2]]))
        )
        assert calls == []
        tiny_llama(
            input_ids=ids,
            attention_mask=torch.ones_like(mask),
            **forward_cache(tiny_llama, BudgetedCache(FULL)),
        )
    assert len(calls) == 2  # an all-ones mask is no padding: both layers took the fast path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunk", [None, 64])
def test_unpadded_prefill_on_the_gpu_matches_the_biased_path(chunk, monkeypatch):
    """bf16 on CUDA: flash (first chunk) and bottom-right causal SDPA (later chunks) + the Triton
    commit against the per-head biased path; rounding may flip a near-tie, so kept positions are
    compared as a share."""
    from transformers import LlamaForCausalLM

    from baklava.runtime.packed_cache import BudgetedLayer
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=512,
        head_dim=64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 96, (1, 300), generator=torch.Generator().manual_seed(5)).cuda()
    caps = [[40, 200]] * cfg.num_hidden_layers
    runs = {}
    for fast in (False, True):
        monkeypatch.setattr(BudgetedLayer, "unpadded_prefill", fast)
        cache = BudgetedCache(caps)
        with torch.inference_mode():
            runs[fast] = (prefill(model, cache, ids, chunk=chunk).float(), cache)
    (ref, ref_cache), (got, got_cache) = runs[False], runs[True]
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    assert torch.equal(got_cache.fill_levels(), ref_cache.fill_levels())
    same = sum(
        int((a.positions == b.positions).sum())
        for a, b in zip(got_cache.layers, ref_cache.layers, strict=True)
    )
    assert same / sum(a.positions.numel() for a in ref_cache.layers) > 0.95


def test_the_cache_goes_in_under_the_keyword_this_transformers_wants(tiny_llama):
    """``cache=`` where transformers renamed ``past_key_values=`` (5.24: forward and generate), the
    old name where it did not (5.17): either way no deprecation warning, and the cache is used."""
    import warnings

    enable(tiny_llama)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    cache, stepped = BudgetedCache([[3, 5], [4, 2]]), BudgetedCache([[3, 5], [4, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tiny_llama.generate(
            input_ids=ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            **generate_cache(tiny_llama, cache),
        )
        with torch.no_grad():
            tiny_llama(input_ids=ids, **forward_cache(tiny_llama, stepped))
    assert int(cache.layers[0].valid_seen[0]) == 12 + 3  # the prompt and three fed-back tokens went in
    assert int(stepped.layers[0].valid_seen[0]) == 12
    assert cache.fill_levels().tolist() == [[[3, 5]], [[4, 2]]]  # and it evicted down to the capacities


def test_a_chunks_padding_scores_nothing_and_stored_masses_add_up():
    """``add_head_masses``: stored slots' masses added to their scores; the new tokens' SnapKV
    scores pooled over neighbours with padding at 0 first (a padded token's mass, however large,
    must not reach a valid neighbour through the max-pool); a head without masses scores 0."""
    from baklava.runtime.packed_cache import BudgetedLayer
    from baklava.runtime.prefill_attention import add_head_masses

    layer = BudgetedLayer([4, 6], EvictionConfig(pool_kernel=3))
    empty = torch.empty(2, 2, 0, 8)
    layer.lazy_initialization(empty, empty)
    layer.scores.fill_(1.0)
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    mass = torch.tensor([[0.5, 0.25, 9.0, 9.0, 0.1, 0.2, 0.3], [0.5, 0.25, 0.4, 0.1, 0.1, 0.2, 0.3]])
    new = add_head_masses(layer, [(2, mass), (0, None)], (2, 2, 5), valid)
    torch.testing.assert_close(layer.scores[:, :2], 1 + mass[:, :2])
    assert torch.equal(layer.scores[:, 2:], torch.ones(2, 8))  # past the head's 2 stored slots
    # row 0: the padded masses (9.0) count as 0 before pooling; row 1: pooled as they are
    assert new[0, 0].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])
    assert new[1, 0].tolist() == pytest.approx([0.4, 0.4, 0.2, 0.3, 0.3])
    assert torch.equal(new[:, 1], torch.zeros(2, 5))
