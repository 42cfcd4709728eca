"""A prefill chunk's decoder-layer forward with fewer, larger kernels (the GPU prefill).

A prompt's prefill on the GPU is host-bound: transformers' eager layer queues ~45 kernels for a
chunk besides the attention and its cache commit (RMSNorm's six twice, three projections for q,
k and v and two for gate and up, RoPE's eight, SiLU and its product, the residual adds), each a
pass over the chunk's activations; on an H200 the engine queued 1,700 PyTorch ops a prompt of
Qwen2.5-0.5B shapes, 39-68 ms (BENCHMARKS.md, "cuDNN's plan per prompt length"). :func:`forward`
runs the same layer as ten launches plus the attention::

    RMSNorm(x) ─▶ x @ [Wq|Wk|Wv]^T (+ b) ─▶ RoPE(q, k), v: head-major ─▶ cache.update + attention
      ─▶ x + o @ Wo^T ─▶ RMSNorm ─▶ h @ [Wg|Wu]^T ─▶ SiLU(gate) * up ─▶ x + a @ Wd^T

(:mod:`baklava.kernels.prefill_layer` holds the three elementwise kernels; the matmuls are
cuBLAS's, on the concatenated weights :func:`baklava.runtime.fused_decode.fuse` builds). Each
kernel rounds where eager PyTorch rounds, so a chunk differs from transformers' forward only by
summation order. The attention is the model's attention implementation as before (the ``baklava``
one: the packed cache's prefill kernels and commit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baklava.kernels.prefill_layer import rms_norm, rope_heads, silu_gate


def layer_inputs(kwargs: dict):
    """``(cache, attention_mask, position_embeddings)`` popped from a decoder layer's keyword
    arguments (transformers < 5.24 passes the cache as ``past_key_values``, later as ``cache``);
    what stays in ``kwargs`` goes on to the attention implementation."""
    cache = kwargs.pop("past_key_values", None)
    named = kwargs.pop("cache", None)
    kwargs.pop("use_cache", None)
    return (
        (named if cache is None else cache),
        kwargs.pop("attention_mask", None),
        kwargs.pop("position_embeddings"),
    )


def forward(layer, fused, interface, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``hidden_states [B, S, hidden]`` through decoder ``layer`` (its ``_baklava_fused`` weights
    ``fused``; ``interface``: the model's attention implementation), as transformers' layer
    forward computes it; returns ``[B, S, hidden]``."""
    cache, attention_mask, (cos, sin) = layer_inputs(kwargs)
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    batch, s, _ = hidden_states.shape
    x = hidden_states.contiguous()
    head_dim = attn.head_dim
    q_heads = attn.q_proj.weight.shape[0] // head_dim
    kv_heads = attn.k_proj.weight.shape[0] // head_dim
    qkv = F.linear(rms_norm(x, ln1.weight, ln1.variance_epsilon), fused.qkv_weight, fused.qkv_bias)
    q, k, v = rope_heads(qkv, cos, sin, q_heads, kv_heads, head_dim)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    x = x + F.linear(out.reshape(batch, s, -1), attn.o_proj.weight)
    act = silu_gate(F.linear(rms_norm(x, ln2.weight, ln2.variance_epsilon), fused.gate_up))
    return x + F.linear(act, mlp.down_proj.weight)
