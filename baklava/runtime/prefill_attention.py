"""Prefill attention of a chunk over a head's ``[stored slots | new tokens]``.

Chunks without padding take :func:`unpadded_chunk` (SDPA's causal kernels, no bias) on the CPU
and wherever the Triton kernels are off (on the GPU they take :mod:`baklava.runtime.kernel_prefill`,
tested against this path); padded batches build each head's bias, in query blocks.

:meth:`baklava.runtime.packed_cache.BudgetedLayer.attend` runs SDPA per KV head for prefill
chunks; these helpers keep its memory bounded for long prompts: queries go ``QUERY_BLOCK`` at a
time, and each block's bias rows are built only when that block runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams
from torch.nn.attention.bias import causal_lower_right

from baklava.runtime.selection import snapkv_pool

QUERY_BLOCK = 2048  # long prefills attend in blocks of queries: the math kernel's memory stays bounded


class HeadBias:
    """One head's additive attention bias over ``[stored slots | new tokens]``, materialised only
    for the query rows asked for: the stored part is one row ``[B, n]`` (slots past ``fill``
    masked), the new part the model's ``[B, 1, q, q]``. A 32k-token prefill thus never holds a
    ``[B, 1, q, n + q]`` tensor (24 GiB at batch 12, which ran out of GPU memory)."""

    def __init__(self, stored: torch.Tensor, new: torch.Tensor):
        self.stored, self.new = stored, new

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        batch, n = self.stored.shape
        stored = self.stored[:, None, None, :].expand(batch, 1, hi - lo, n)
        return torch.cat([stored, self.new[:, :, lo:hi]], dim=-1)


def sdpa_in_query_blocks(q, k, v, bias: HeadBias, scale) -> torch.Tensor:
    """SDPA of ``q [B, g, q, D]`` with ``bias`` rows ``[B, 1, q, k]``, ``QUERY_BLOCK`` queries at a time."""
    q_len = q.shape[2]
    blocks = [
        F.scaled_dot_product_attention(
            q[:, :, i : i + QUERY_BLOCK],
            k,
            v,
            attn_mask=bias.rows(i, min(i + QUERY_BLOCK, q_len)),
            scale=scale,
        )
        for i in range(0, q_len, QUERY_BLOCK)
    ]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)


def new_token_bias(mask: torch.Tensor | None, batch: int, q_len: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, q, q]`` additive bias among the new tokens (causal when no mask is given)."""
    if mask is None:
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=like.device).tril()
        bias = torch.zeros(q_len, q_len, dtype=like.dtype, device=like.device)
        bias.masked_fill_(~causal, torch.finfo(like.dtype).min)
        return bias.expand(batch, 1, q_len, q_len)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
        bias.masked_fill_(~mask, torch.finfo(like.dtype).min)
        mask = bias
    mask = mask[..., -q_len:].to(like.dtype)
    return mask.expand(batch, 1, q_len, q_len)


def real_tokens(bias: torch.Tensor) -> torch.Tensor:
    """``[B, q]`` bool of ``bias [B, 1, q, q]`` (:func:`new_token_bias`): False for padding, the
    tokens the mask hides even from themselves."""
    return torch.diagonal(bias[:, 0], dim1=-2, dim2=-1) == 0


# ---------------------------------------------------------------------- chunks without padding
# A chunk whose rows have no padding (the engine's prefill, baklava-run with one prompt, every
# chunk of an unpadded batch) needs no bias at all: each query sees every stored slot and the new
# tokens up to itself, i.e. causal attention aligned to the bottom right. SDPA runs that on its
# flash kernel; the first chunk (nothing stored) is one call for every head of the layer.


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale) -> torch.Tensor:
    """``q [B, Hq, s, D]`` over ``k, v [B, H, past + s, D]`` (``Hq`` a multiple of ``H``): the
    ``past`` stored keys are all visible, the ``s`` new ones causally. Returns ``[B, Hq, s, D]``."""
    if past == 0:
        return causal_self_attention(q, k, v, scale)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the bottom-right causal bias takes no GQA: every query head gets its keys
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


# Above this many attention FLOPs a layer (2 n^2 d Hq; Qwen2.5-0.5B's heads to ~23k tokens,
# Llama-3-8B's to ~12k), a causal first chunk takes SDPA's own choice instead of flash: see below.
FLASH_MAX_FLOPS = 1.0e12


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
    """Causal attention of ``q [B, Hq, s, D]`` over ``k, v [B, H, s, D]`` (GQA); see
    :func:`causal_self_attention_lse`."""
    return causal_self_attention_lse(q, k, v, scale)[0]


def causal_self_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of ``q [B, Hq, s, D]`` over ``k, v [B, H, s, D]`` (GQA), and each
    query's log-sum-exp ``[B, Hq, s]`` (float32, natural log) where the kernel gives it (flash),
    else None.

    SDPA's own choice on Hopper is cuDNN, which builds an execution plan for every sequence length
    it has not met on the calling thread (its plan cache is per thread): on an H200, 42-44 ms of
    host time for each new length (820 ms the first time in a process), more than the whole
    prefill of a 4k-token prompt. A server's prompts all differ in length and its engine steps on
    its own thread, so every request paid it, twice over what its prefill cost (BENCHMARKS.md,
    "cuDNN's plan per prompt length"). Flash attention has no plan; its kernel is slower than
    cuDNN's at long lengths (1.6x at 16k tokens of Qwen2.5-0.5B's heads: 1.75 against 1.08 ms a
    layer), which over a model's layers outweighs one plan past ``FLASH_MAX_FLOPS`` a layer; up to
    it, on CUDA, flash runs. Elsewhere (the CPU, fp32, longer chunks) SDPA picks as usual."""
    batch, q_heads, s, dim = q.shape
    flops = 2.0 * s * s * dim * q_heads * batch
    if (
        q.is_cuda
        and flops <= FLASH_MAX_FLOPS
        and torch.backends.cuda.can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, True, True))
    ):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[
            :2
        ]
        return out, (lse if lse.shape == (batch, q_heads, s) else None)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True), None


def observation_mass(q: torch.Tensor, k: torch.Tensor, past: int, obs: int, scale) -> torch.Tensor:
    """SnapKV's scores of an unpadded chunk: the attention the last ``obs`` queries of
    ``q [B, Hq, s, D]`` pay to each key of ``k [B, H, past + s, D]``, summed over those queries
    and averaged over each head's query group. Returns ``[B, H, past + s]`` float32."""
    batch, q_heads, s, dim = q.shape
    heads, keys = k.shape[1], k.shape[2]
    group = q_heads // heads
    window = q[:, :, s - obs :].float().reshape(batch, heads, group * obs, dim)
    logits = (window @ k.float().transpose(-1, -2)).view(batch, heads, group, obs, keys) * scale
    visible = torch.ones(obs, keys, dtype=torch.bool, device=q.device).tril(keys - obs)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.sum(3).mean(2)


def unpadded_chunk(layer, query, k_new, v_new, scale, obs: int):
    """Attention of a chunk without padding over ``layer`` 's stored slots and the chunk itself.

    Returns ``(out [B, Hq, s, D], [(n_h, mass_h [B, n_h + s] or None) per KV head])`` for the
    layer's commit (``obs`` = 0: no scores), or None when the rows hold different numbers of
    tokens (then the caller masks per row). The reference of the GPU route
    (:func:`baklava.runtime.kernel_prefill.chunk`)."""
    batch, q_heads, s, _ = query.shape
    heads = layer.num_heads
    group = q_heads // heads
    fills = layer.fill.tolist() if layer.seen else [[0] * heads] * batch
    if any(row != fills[0] for row in fills):
        return None
    if not any(fills[0]):  # nothing stored: one flash call for every head
        out = causal_attention(query, k_new, v_new, 0, scale)
        if not obs:
            return out, [(0, None)] * heads
        mass = observation_mass(query, k_new, 0, obs, scale)
        return out, [(0, mass[:, h]) for h in range(heads)]
    out = query.new_empty(batch, q_heads, s, v_new.shape[-1])
    masses = []
    for h, (off, n) in enumerate(zip(layer.offsets, fills[0], strict=True)):
        stored = slice(None), slice(off, off + n)
        k = torch.cat([layer.stored("keys", *stored), k_new[:, h]], dim=1)[:, None]  # [B, 1, n + s, D]
        v = torch.cat([layer.stored("values", *stored), v_new[:, h]], dim=1)[:, None]
        qh = query[:, h * group : (h + 1) * group]
        out[:, h * group : (h + 1) * group] = causal_attention(qh, k, v, n, scale)
        masses.append((n, observation_mass(qh, k, n, obs, scale)[:, 0] if obs else None))
    return out, masses


def append_chunk(layer, slots: dict, masses) -> None:
    """Commit an unpadded chunk (``slots``: each slot tensor's ``[B, H_kv, S, width]``) that fits
    every head (``n + S <= cap`` for each head's ``(n, mass)`` of :func:`unpadded_chunk`): stored
    slots add their masses to their scores, and :func:`append` writes the new tokens after them.
    No selection, no copy of the layer: at budget 1.0 every chunk of a prompt within the reference
    context takes this path."""
    s = slots["keys"].shape[2]
    append(layer, slots, add_head_masses(layer, masses, slots["keys"].shape[:3]))
    layer.valid_seen += s
    layer.seen += s


def add_head_masses(layer, masses, shape, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Add each head's stored slots' masses to their scores (``masses``: each head's ``(n, mass
    [B, n + S] or None)`` of the per-head path) and return the new tokens' SnapKV scores, pooled,
    ``shape = [B, H_kv, S]`` (0 where ``valid [B, S]`` is False, and for a head without masses)."""
    new_scores = torch.zeros(*shape, device=layer.device)
    for h, ((n, mass), off) in enumerate(zip(masses, layer.offsets, strict=True)):
        if mass is not None:
            layer.scores[:, off : off + n] += mass[:, :n]
            new_scores[:, h] = mass[:, n:] if valid is None else mass[:, n:].masked_fill(~valid, 0)
    return snapkv_pool(new_scores, layer.eviction.pool_kernel)


def append(layer, slots: dict, new_scores: torch.Tensor) -> None:
    """Write a chunk without padding after each head's live slots (``fill``, read on the device),
    every row and head in one ``index_copy_`` per slot tensor: the reference's room-for-everything
    branch (``BudgetedLayer._commit_head``). ``new_scores [B, H_kv, S]``: the new tokens' scores;
    the caller knows every head has room and advances ``seen``."""
    batch, heads, s = new_scores.shape
    step = torch.arange(s, device=layer.device)
    dest = layer.device_offsets.to(torch.int64)[None, :, None] + layer.fill[:, :, None] + step  # [B, H, S]
    rows = (torch.arange(batch, device=layer.device)[:, None, None] * layer.total + dest).view(-1)
    for name, new in slots.items():  # [B, H, S, width] into [B, sum(cap), width]
        buf = getattr(layer, name)
        buf.view(-1, buf.shape[-1]).index_copy_(0, rows, new.reshape(-1, new.shape[-1]))
    positions = (layer.valid_seen[:, None, None] + step).expand(batch, heads, s)
    layer.positions.view(-1).index_copy_(0, rows, positions.reshape(-1).to(layer.positions.dtype))
    layer.scores.view(-1).index_copy_(0, rows, new_scores.reshape(-1))
    layer.fill += s


def head_inputs(layer, h: int, query, k_new, v_new, new_bias):
    """What head ``h``'s query group attends over in a prefill chunk: ``(n, q, k, v, bias)`` with
    ``n`` the live slots of the fullest row, ``q [B, g, q, D]``, ``k, v [B, g, n + q, D]``
    (stored slots, then the new tokens; quantized slots dequantized) and the :class:`HeadBias`
    masking slots past each row's fill and the new tokens by the model's mask."""
    batch, q_heads, q_len, _ = query.shape
    group = q_heads // layer.num_heads
    off = layer.offsets[h]
    n = int(layer.fill[:, h].max())
    stored = slice(None), slice(off, off + n)
    keys = torch.cat([layer.stored("keys", *stored), k_new[:, h]], dim=1)  # [B, n + q, D]
    values = torch.cat([layer.stored("values", *stored), v_new[:, h]], dim=1)
    live = torch.arange(n, device=layer.device)[None, :] < layer.fill[:, h, None]  # [B, n]
    stored_bias = torch.zeros(batch, n, dtype=new_bias.dtype, device=layer.device)
    stored_bias.masked_fill_(~live, torch.finfo(new_bias.dtype).min)
    bias = HeadBias(stored_bias, new_bias)  # rows built a block at a time
    k_g = keys[:, None].expand(batch, group, n + q_len, keys.shape[-1])
    v_g = values[:, None].expand(batch, group, n + q_len, values.shape[-1])
    return n, query[:, h * group : (h + 1) * group], k_g, v_g, bias
