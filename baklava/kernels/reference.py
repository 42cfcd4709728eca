"""Plain PyTorch references of the kernels' contracts (the oracle of the GPU tests).

``packed_decode_attention`` is one decode step of
:meth:`baklava.runtime.packed_cache.BudgetedLayer.attend` (``S = 1``), written as a pure function
on the packed layout, before the step's token is committed.
"""

from __future__ import annotations

import torch


def packed_decode_attention(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    fill: torch.Tensor,
    capacities: list[int],
    scale: float,
) -> torch.Tensor:
    """Decode attention over the packed cache plus the step's own token.

    Parameters
    ----------
    query : ``[B, H_q, D]``
    key_new, value_new : ``[B, H_kv, D]`` the new token (post-RoPE key)
    keys, values : ``[B, C, D]`` packed; head ``h`` owns slots ``[o_h, o_h + cap_h)``
    fill : ``[B, H_kv]`` live slots per head (``<= cap_h``)

    Returns
    -------
    ``[B, H_q, D]`` in float32.
    """
    batch, q_heads, _ = query.shape
    kv_heads = len(capacities)
    group = q_heads // kv_heads
    out = torch.empty(batch, q_heads, values.shape[-1], dtype=torch.float32, device=query.device)
    offset = 0
    for h, cap in enumerate(capacities):
        for b in range(batch):
            n = int(fill[b, h])
            k = torch.cat([keys[b, offset : offset + n], key_new[b, h : h + 1]]).float()  # [n + 1, D]
            v = torch.cat([values[b, offset : offset + n], value_new[b, h : h + 1]]).float()
            q = query[b, h * group : (h + 1) * group].float()  # [g, D]
            out[b, h * group : (h + 1) * group] = torch.softmax(q @ k.T * scale, dim=-1) @ v
        offset += cap
    return out
