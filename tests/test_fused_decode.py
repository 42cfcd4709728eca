"""The fused one-token decoder-layer forward (runtime/fused_decode.py) against transformers' own.

Without CUDA the kernels run in Triton's interpreter on the CPU (float32), where the fused step
must match the original up to float32 rounding; on CUDA in bfloat16, up to bf16 rounding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from baklava.kernels import decode_gemv
from baklava.kernels.rope import rope_split
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.fused_decode import fuse, supported

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


@pytest.mark.parametrize("gemv_rows", [64, 1], ids=["gemv", "cublas-above-gemv-rows"])
@pytest.mark.parametrize("make", [_llama_tiny, _qwen2_tiny], ids=["llama", "qwen2-bias"])
def test_fused_steps_match_the_original_forward(make, gemv_rows, monkeypatch):
    """Prefill (original forward for both: the fused chunk forward has its own tests in
    test_fused_prefill.py, and its rounding may flip near-tied evictions on the GPU), then decode
    steps through an evicting budgeted cache: logits of every step and the cache's kept slots
    agree with the unfused model. Two rows a step: the Triton matmuls, or (``GEMV_ROWS`` below
    two) the chunk forward's cuBLAS ones that an engine's large buckets take."""
    from baklava.runtime import fused_decode, fused_prefill

    chunk_steps, chunk_forward = [], fused_prefill.forward
    monkeypatch.setattr(fused_decode, "GEMV_ROWS", gemv_rows)
    monkeypatch.setattr(
        fused_prefill,
        "forward",
        lambda layer, *a, **k: chunk_steps.append(a[2].shape) or chunk_forward(layer, *a, **k),
    )
    ref = make().to(DEVICE, DTYPE)
    fused = copy.deepcopy(ref)
    for m in (ref, fused):
        enable(m)
    assert fuse(fused, device_types=(DEVICE,), prefill=False)
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
            logits = model(input_ids=ids, **forward_cache(model, cache)).logits[:, -1]
            tokens.append(logits.argmax(-1, keepdim=True))
        torch.testing.assert_close(tokens[0], tokens[1])
        token = tokens[0]
        for _ in range(6):  # every head fills and evicts
            a = ref(input_ids=token, **forward_cache(ref, caches[0])).logits[:, -1].float()
            b = fused(input_ids=token, **forward_cache(fused, caches[1])).logits[:, -1].float()
            torch.testing.assert_close(b, a, **TOL)
            token = a.argmax(-1, keepdim=True)
    for la, lb in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(la.positions, lb.positions) and torch.equal(la.fill, lb.fill)
        torch.testing.assert_close(lb.keys, la.keys, **TOL)
    layers = len(fused.model.layers)
    assert chunk_steps == ([] if gemv_rows >= 2 else [(2, 1, 64)] * 6 * layers)


def _eager_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("rows", [3, 20, 70], ids=["rows3", "rows20-block32", "rows70-two-blocks"])
def test_decode_matmuls_fold_norm_and_residual_like_eager(rows):
    """Each fused matmul equals eager RMSNorm / linear / SiLU / residual add; shapes are not
    multiples of the blocks; the partial sums of squares a residual matmul leaves behind give the
    next norm the same result as summing the squares afresh."""
    torch.manual_seed(0)
    hidden, out_cols, inner, eps = 200, 72, 180, 1e-6
    x = torch.randn(rows, hidden, device=DEVICE, dtype=DTYPE)
    nw = torch.rand(hidden, device=DEVICE, dtype=DTYPE) + 0.5
    w = torch.randn(out_cols, hidden, device=DEVICE, dtype=DTYPE) * 0.1
    b = torch.randn(out_cols, device=DEVICE, dtype=DTYPE)
    ss = decode_gemv.sum_squares(x)
    torch.testing.assert_close(ss[0], x.float().pow(2).sum(-1), rtol=1e-5, atol=1e-4)
    h = _eager_norm(x, nw, eps)
    torch.testing.assert_close(decode_gemv.norm_linear(x, ss, nw, eps, w, b), F.linear(h, w, b), **TOL)
    torch.testing.assert_close(decode_gemv.norm_linear(x, ss, nw, eps, w), F.linear(h, w), **TOL)

    gate_up = torch.randn(2 * inner, hidden, device=DEVICE, dtype=DTYPE) * 0.1
    g, u = F.linear(h, gate_up).split(inner, -1)
    act = decode_gemv.norm_linear_silu(x, ss, nw, eps, gate_up)
    torch.testing.assert_close(act, F.silu(g) * u, **TOL)

    wd = torch.randn(hidden, inner, device=DEVICE, dtype=DTYPE) * 0.1
    y, partials = decode_gemv.linear_residual(act, wd, x)
    torch.testing.assert_close(y, x + F.linear(act, wd), **TOL)
    assert partials.shape[1] == rows and partials.shape[0] > 1  # one row of partials per program
    torch.testing.assert_close(partials.sum(0), y.float().pow(2).sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        decode_gemv.norm_linear(y, partials, nw, eps, w),
        decode_gemv.norm_linear(y, decode_gemv.sum_squares(y), nw, eps, w),
        **TOL,
    )


def test_chain_hands_partials_to_the_next_layer_only():
    """A layer's partial sums of squares reach the next layer for the same tensor, once; any other
    layer, tensor or a second take sums the squares afresh (so a stale buffer is never used)."""
    from baklava.runtime.fused_decode import _Chain

    x = torch.randn(3, 40, device=DEVICE, dtype=DTYPE)
    partials = torch.full((5, 3), -1.0, device=DEVICE)  # not x's: a fresh sum is distinguishable
    fresh = decode_gemv.sum_squares(x)
    chain = _Chain()
    chain.put(4, x, partials)
    assert chain.take(5, x) is partials
    assert torch.equal(chain.take(5, x), fresh)  # taken once
    for layer, other in ((6, x), (0, x), (5, x.clone())):
        chain.put(4, x, partials)
        assert torch.equal(chain.take(layer, other), fresh)


def test_rope_rounds_like_eager():
    torch.manual_seed(0)
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
