"""The ``baklava`` attention implementation for transformers models.

transformers dispatches attention through ``AttentionInterface``; registering ``"baklava"``
there lets an unmodified Llama / Qwen2 / Mistral model attend over a
:class:`~baklava.runtime.packed_cache.BudgetedCache`: when the keys come from a budgeted layer,
the layer computes attention over its packed slots and commits the step; otherwise (no cache, or
an ordinary one) this falls back to PyTorch SDPA, so the model stays usable for anything else.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

IMPLEMENTATION = "baklava"


def baklava_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``query [B, H_q, q, D]``, ``key/value [B, H_kv, k, D]`` -> ``([B, q, H_q, D], None)``."""
    layer = getattr(key, "_baklava_layer", None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scale)


def baklava_mask(*, q_length: int, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' eager mask, except none where no token is padding.

    The packed cache masks its stored slots by fill level, so a step without padding needs no
    mask: a decode step must not build one (it would copy a host scalar to the device, which a
    CUDA graph cannot capture), and a prefill chunk without one runs SDPA's causal kernels
    (:func:`baklava.runtime.prefill_attention.unpadded_chunk`) instead of a biased loop per head.
    """
    if attention_mask is None:
        return None
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if q_length > 1 and not tracing and bool(attention_mask.all()):
        return None
    return eager_mask(q_length=q_length, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register the ``baklava`` attention and its mask builder with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, baklava_attention)
    # Float masks over the new tokens only; stored slots are masked by the cache's fill levels.
    AttentionMaskInterface.register(IMPLEMENTATION, baklava_mask)


def enable(model) -> None:
    """Switch ``model`` to the ``baklava`` attention implementation."""
    register()
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
