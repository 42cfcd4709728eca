"""The CUDA-graph decode loop against eager decoding (GPU only)."""

import numpy as np
import pytest
import torch

from baklava.profiles.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cuda_graph import greedy_cuda_graph

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_graph_replay_decodes_like_eager(dtype, policy):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(tiny_config(num_attention_heads=8, num_key_value_heads=4)).to("cuda", dtype).eval()
    )
    enable(model)
    caps = np.array([[1, 7, 12, 30], [9, 3, 16, 5]])  # evicts from the first decode step on
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    ids = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: positions differ per row
    caches, tokens = [], []
    for graphed in (False, True):
        cache = BudgetedCache(caps, ev)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
            if graphed:
                out = greedy_cuda_graph(model, cache, logits.argmax(-1), 16)
            else:
                out, grown, token = [logits.argmax(-1)], mask, logits.argmax(-1, keepdim=True)
                for _ in range(15):
                    grown = torch.cat([grown, torch.ones_like(grown[:, :1])], 1)
                    position = grown.sum(1, keepdim=True) - 1  # real tokens before it, as the graph feeds
                    logits = model(
                        input_ids=token, attention_mask=grown, position_ids=position, past_key_values=cache
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
