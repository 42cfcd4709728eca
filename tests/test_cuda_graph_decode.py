"""The CUDA-graph decode loop against eager decoding (GPU only)."""

import copy

import numpy as np
import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache, generate_cache
from baklava.runtime.cuda_graph import greedy_cuda_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def _tiny_gqa(dtype):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(tiny_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=4))
        .to("cuda", dtype)
        .eval()
    )
    enable(model)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_graph_replay_decodes_like_eager(dtype, policy):
    model = _tiny_gqa(dtype)
    caps = np.array([[1, 7, 12, 30], [9, 3, 16, 5]])  # evicts from the first decode step on
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    ids = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: positions differ per row
    caches, tokens = [], []
    for graphed in (False, True):
        cache = BudgetedCache(caps, ev)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, **forward_cache(model, cache)).logits[:, -1]
            if graphed:
                out = greedy_cuda_graph(model, cache, logits.argmax(-1), 16)
            else:
                out, grown, token = [logits.argmax(-1)], mask, logits.argmax(-1, keepdim=True)
                for _ in range(15):
                    grown = torch.cat([grown, torch.ones_like(grown[:, :1])], 1)
                    position = grown.sum(1, keepdim=True) - 1  # real tokens before it, as the graph feeds
                    logits = model(
                        input_ids=token,
                        attention_mask=grown,
                        position_ids=position,
                        **forward_cache(model, cache),
                    ).logits
                    token = logits[:, -1:].argmax(-1)
                    out.append(token[:, 0])
                out = torch.stack(out, 1)
        caches.append(cache)
        tokens.append(out)
    assert torch.equal(tokens[0], tokens[1])
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.fill, b.fill)
        assert a.seen == b.seen and torch.equal(a.valid_seen, b.valid_seen)


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_triton_kernels_decode_like_the_torch_path(policy, monkeypatch):
    """Model level, fp32: the Triton decode step (auto on CUDA) keeps the tokens the PyTorch path
    keeps and greedy decoding gives the same tokens (heads compared as position sets: the kernel
    overwrites the evicted slot instead of shifting)."""
    from baklava.runtime.packed_cache import BudgetedLayer

    model = _tiny_gqa(torch.float32)
    caps = np.array([[1, 7, 12, 30], [9, 3, 16, 5]])
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    ids = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(1)).cuda()
    runs = []
    for kernels in ("torch", "auto"):
        monkeypatch.setattr(BudgetedLayer, "decode_kernels", kernels)
        cache = BudgetedCache(caps, ev)
        with torch.inference_mode():
            logits = model(input_ids=ids, **forward_cache(model, cache)).logits[:, -1]
            tokens = greedy_cuda_graph(model, cache, logits.argmax(-1), 16)
        runs.append((tokens, cache))
    (t_torch, c_torch), (t_triton, c_triton) = runs
    assert torch.equal(t_torch, t_triton)
    for a, b in zip(c_torch.layers, c_triton.layers, strict=True):
        assert torch.equal(a.fill, b.fill)
        for row in range(3):
            for h in range(4):
                assert torch.equal(a.head_positions(h, row), b.head_positions(h, row).sort().values)


def test_generate_on_cuda_equals_model_generate(tiny_model_dir):
    """``generate`` on CUDA (prefill + CUDA-graph steps) against ``model.generate`` with the same
    cache capacities, left-padded batch of two prompts."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from baklava.runtime import generate

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).to("cuda").eval()
    reference = copy.deepcopy(model)  # generate() fuses its model's layers in place
    enable(reference)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    caps = np.full((2, 2), 9)
    prompts = ["the a of to and in is for that with as on", "this is"]
    got = generate(model, tokenizer, BudgetedCache(caps), prompts, max_new_tokens=12, chat=False)
    assert hasattr(model.model.layers[0], "_baklava_fused")
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    with torch.inference_mode():
        out = reference.generate(
            **batch,
            **generate_cache(reference, BudgetedCache(caps)),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
    for i, g in enumerate(got):
        want = out[i, batch["input_ids"].shape[1] :].tolist()
        if tokenizer.eos_token_id in want:
            want = want[: want.index(tokenizer.eos_token_id) + 1]
        assert g.token_ids == want


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_overlapped_cache_updates_change_nothing(policy):
    """The layers' cache updates on a second stream inside the graph (the default) give the same
    tokens and the same cache, bit for bit, as the updates in line; heads long enough that the
    update kernels run alongside the next layers' work. The stream is uninstalled after capture."""
    from transformers import LlamaForCausalLM

    from baklava.runtime.cuda_graph import DecodeGraph
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    enable(model)
    caps = np.array([[900, 40, 2000, 300]] * 4)
    ev = EvictionConfig(sink=4, window=16, policy=policy)
    ids = torch.randint(3, 96, (4, 2500), generator=torch.Generator().manual_seed(2)).cuda()
    runs = []
    for overlap in (False, True):
        cache = BudgetedCache(caps, ev)
        with torch.inference_mode():
            first = model(input_ids=ids, **forward_cache(model, cache)).logits[:, -1].argmax(-1)
            graph = DecodeGraph(model, cache, first, 24, overlap_updates=overlap)
            for _ in range(23):
                graph.replay()
        assert all(layer.update_stream is None for layer in cache.layers)
        runs.append((graph.tokens, cache))
    (t_a, c_a), (t_b, c_b) = runs
    assert torch.equal(t_a, t_b)
    for a, b in zip(c_a.layers, c_b.layers, strict=True):
        for name in ("keys", "values", "positions", "scores", "fill", "valid_seen"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
