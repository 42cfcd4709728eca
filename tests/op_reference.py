"""The PyTorch reference of one layer's two ops (``BudgetedLayer``), shared by the op tests:
ONNX Runtime (``test_onnx_ops``) and the TensorRT plugins' kernels (``test_aot_kernels``)."""

import numpy as np
import torch

from baklava.runtime.prefill_attention import new_token_bias

D = 8


def step_inputs(gen, batch, q_heads, kv_heads, seq, pad_rows, head_dim=D):
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen)
    token_mask = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in pad_rows.items():
        token_mask[row, :pad] = False
    return q, k, v, token_mask


def causal_bias(token_mask):
    batch, seq = token_mask.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None] & token_mask[:, None, None, :]
    return new_token_bias(allowed, batch, seq, torch.zeros(1))


def reference_step(layer, q, k, v, token_mask):
    layer.update(k, v)
    out, _ = layer.attend(q, causal_bias(token_mask), q.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # [B, H_q, S, D]


def state(layer):
    return {
        "past_key": layer.keys.numpy().copy(),
        "past_value": layer.values.numpy().copy(),
        "past_position": layer.positions.numpy().astype(np.int64),  # the graph's dtype (the cache: int32)
        "past_score": layer.scores.numpy().copy(),
        "past_fill": layer.fill.numpy().copy(),
        "seen": layer.valid_seen.numpy().copy(),
    }


def assert_same_cache(sess_out, layer, caps, atol=1e-6):
    """``sess_out``: ``(output, key, value, position, score, fill)`` after the step (numpy)."""
    _, pk, pv, ppos, pscore, pfill = sess_out
    np.testing.assert_array_equal(pfill, layer.fill.numpy())
    offsets = np.cumsum([0, *caps[:-1]])
    for b in range(pfill.shape[0]):
        for h, (off, _cap) in enumerate(zip(offsets, caps, strict=True)):
            n = int(pfill[b, h])  # only live slots are defined
            sl = slice(off, off + n)
            np.testing.assert_array_equal(ppos[b, sl], layer.positions[b, sl].numpy())
            np.testing.assert_allclose(pk[b, sl], layer.keys[b, sl].numpy(), atol=atol)
            np.testing.assert_allclose(pv[b, sl], layer.values[b, sl].numpy(), atol=atol)
            np.testing.assert_allclose(pscore[b, sl], layer.scores[b, sl].numpy(), atol=1e-5)
