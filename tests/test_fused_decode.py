"""The fused one-token decoder-layer forward (runtime/fused_decode.py) against transformers' own.

Without CUDA the kernels run in Triton's interpreter on the CPU (float32), where the fused step
must match the original up to float32 rounding; on CUDA in bfloat16, up to bf16 rounding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from baklava.runtime import BudgetedCache, enable
from baklava.runtime.fused_decode import add_rms_norm, fuse, rms_norm, rope_split, silu_mul, supported

from .conftest import tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = dict(rtol=2e-2, atol=2e-2) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-5)


def _qwen2_tiny():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def _llama_tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(intermediate_size=160)).eval()


@pytest.mark.parametrize("make", [_llama_tiny, _qwen2_tiny], ids=["llama", "qwen2-bias"])
def test_fused_steps_match_the_original_forward(make):
    """Prefill (original forward), then decode steps through an evicting budgeted cache: logits of
    every step and the cache's kept slots agree with the unfused model."""
    ref = make().to(DEVICE, DTYPE)
    fused = copy.deepcopy(ref)
    for m in (ref, fused):
        enable(m)
    assert fuse(fused, device_types=(DEVICE,))
    weights = fused.model.layers[0].self_attn
    assert (
        weights.k_proj.weight.data_ptr()
        == weights.q_proj.weight.data_ptr() + 64 * 64 * weights.q_proj.weight.element_size()
    )
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    caches = [BudgetedCache(np.array([[24, 30], [18, 40]]), None) for _ in range(2)]
    with torch.inference_mode():
        tokens = []
        for model, cache in zip((ref, fused), caches, strict=True):
            logits = model(input_ids=ids, past_key_values=cache).logits[:, -1]
            tokens.append(logits.argmax(-1, keepdim=True))
        torch.testing.assert_close(tokens[0], tokens[1])
        token = tokens[0]
        for _ in range(6):  # every head fills and evicts
            a = ref(input_ids=token, past_key_values=caches[0]).logits[:, -1].float()
            b = fused(input_ids=token, past_key_values=caches[1]).logits[:, -1].float()
            torch.testing.assert_close(b, a, **TOL)
            token = a.argmax(-1, keepdim=True)
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.positions, lb.positions) and torch.equal(la.fill, lb.fill)
        torch.testing.assert_close(lb.keys, la.keys, **TOL)


def test_kernels_round_like_eager():
    torch.manual_seed(0)
    x = torch.randn(3, 96, device=DEVICE, dtype=DTYPE)
    w = torch.randn(96, device=DEVICE, dtype=DTYPE)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DTYPE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), want, **TOL)
    o = torch.randn_like(x)
    xo, y = add_rms_norm(x, o, w, 1e-6)
    assert torch.equal(xo, x + o)
    torch.testing.assert_close(y, rms_norm(x + o, w, 1e-6), **TOL)

    q_heads, kv_heads, d = 4, 2, 16
    qkv = torch.randn(3, (q_heads + 2 * kv_heads) * d, device=DEVICE, dtype=DTYPE)
    angle = torch.randn(3, 1, d // 2, device=DEVICE)
    cos = torch.cat([angle.cos()] * 2, -1).to(DTYPE)
    sin = torch.cat([angle.sin()] * 2, -1).to(DTYPE)
    q, k, v = rope_split(qkv, cos, sin, q_heads, kv_heads, d)
    heads = qkv.view(3, q_heads + 2 * kv_heads, 1, d)

    def rotate(t):
        rot = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)
        return t * cos[:, None] + rot * sin[:, None]

    torch.testing.assert_close(q, rotate(heads[:, :q_heads]), **TOL)
    torch.testing.assert_close(k, rotate(heads[:, q_heads : q_heads + kv_heads]), **TOL)
    assert torch.equal(v, heads[:, q_heads + kv_heads :])

    gu = torch.randn(3, 2 * 1100, device=DEVICE, dtype=DTYPE)  # not a multiple of the block
    want = torch.nn.functional.silu(gu[:, :1100]) * gu[:, 1100:]
    torch.testing.assert_close(silu_mul(gu), want, **TOL)


def test_unsupported_models_are_left_alone():
    from transformers import LlamaForCausalLM

    model = _llama_tiny()
    model.config.hidden_act = "gelu"
    assert "activation 'gelu'" in supported(model)
    before = model.model.layers[0].forward
    assert not fuse(model)
    assert model.model.layers[0].forward == before
    biased = LlamaForCausalLM(tiny_config(mlp_bias=True)).eval()  # the fused MLP has no biases
    assert supported(biased) == "the MLP's projections have biases" and not fuse(biased)
    biased = LlamaForCausalLM(tiny_config(attention_bias=True)).eval()  # o_proj too
    assert supported(biased) == "o_proj has a bias" and not fuse(biased)


def test_prefill_and_other_devices_take_the_original_forward():
    """Fused for CUDA only, a CPU model runs its original layers (bit-identical logits)."""
    ref = _llama_tiny()
    fused = copy.deepcopy(ref)
    assert fuse(fused, device_types=("cuda",))
    ids = torch.randint(3, 96, (1, 12))
    with torch.inference_mode():
        assert torch.equal(ref(input_ids=ids).logits, fused(input_ids=ids).logits)
