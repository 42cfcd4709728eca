"""KV memory of the packed cache, measured: bytes allocated, largest batch, peak of a long prefill.

Every figure comes from allocations, not formulas: the cache's tensors (and, on a GPU, the
allocator's own count) for the bytes; caches really allocated at ``b`` and ``b + 1`` sequences
for the largest batch that fits a memory size; ``torch.cuda.max_memory_allocated`` around a
prefill for its peak.
"""

from __future__ import annotations

import numpy as np
import torch

from baklava.bench.gpu_decode import model_shape
from baklava.eviction import EvictionConfig
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.generate import prefill
from baklava.runtime.packed_cache import BudgetedCache


def allocate(
    model, capacities, batch: int, eviction: EvictionConfig | None = None, kv_format=None
) -> BudgetedCache:
    """A budgeted cache for ``batch`` sequences with every layer's buffers allocated (empty), its
    slots in ``kv_format`` (:mod:`baklava.kv_format`; default the model's dtype)."""
    _, kv_heads, _, head_dim = model_shape(model)
    param = next(model.parameters())
    cache = BudgetedCache(capacities, eviction, kv_format)
    empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=param.dtype, device=param.device)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
    return cache


def cache_bytes(model, capacities, batch: int, kv_format=None) -> dict:
    """``kv`` and ``metadata`` bytes of the cache's tensors, and on a GPU what the allocator saw."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    cache = allocate(model, capacities, batch, kv_format=kv_format)
    row = {"batch": batch, "kv_bytes": cache.kv_bytes(), "metadata_bytes": cache.metadata_bytes()}
    row["total_bytes"] = row["kv_bytes"] + row["metadata_bytes"]
    if cuda:
        row["device_allocated_bytes"] = torch.cuda.memory_allocated(device) - before
    del cache
    return row


def _fits(model, capacities, batch: int, limit: int, kv_format=None) -> bool:
    row = cache_bytes(model, capacities, batch, kv_format)
    return row.get("device_allocated_bytes", row["total_bytes"]) <= limit


def largest_batch(model, capacities, limit: int, kv_format=None) -> dict:
    """The most sequences whose cache (KV and bookkeeping) fits in ``limit`` bytes.

    The per-sequence size is read from caches of 1 and 2 sequences; the answer ``b`` is then
    checked by allocating ``b`` (must fit) and ``b + 1`` (must not).
    """
    one = cache_bytes(model, capacities, 1, kv_format)
    two = cache_bytes(model, capacities, 2, kv_format)
    key = "device_allocated_bytes" if "device_allocated_bytes" in one else "total_bytes"
    per_seq = two[key] - one[key]
    if one[key] > limit:
        return {"limit_bytes": limit, "batch": 0, "bytes_per_sequence": per_seq}
    batch = max(1, (limit - (one[key] - per_seq)) // per_seq)
    while batch > 1 and not _fits(model, capacities, batch, limit, kv_format):
        batch -= 1
    while _fits(model, capacities, batch + 1, limit, kv_format):
        batch += 1
    return {"limit_bytes": limit, "batch": int(batch), "bytes_per_sequence": per_seq}


@torch.inference_mode()
def prefill_peak(model, *, context: int, capacities=None, chunk: int | None = None, seed: int = 0) -> dict:
    """Peak GPU memory above the model while a ``context``-token prompt is prefilled.

    ``capacities`` ``[L, H_kv]``: into a budgeted cache (in ``chunk``-token pieces, or one pass);
    ``None``: plain transformers (SDPA, ``DynamicCache``).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("prefill_peak measures GPU memory: the model must be on a CUDA device")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.config.vocab_size - 1, (1, context), generator=gen).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if capacities is None:
        implementation = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            cache = DynamicCache()
            model(input_ids=ids, **forward_cache(model, cache), logits_to_keep=1)
        finally:
            model.set_attn_implementation(implementation)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    else:
        cache = BudgetedCache(np.asarray(capacities))
        prefill(model, cache, ids, chunk=chunk)
        kv = cache.kv_bytes()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del cache
    torch.cuda.empty_cache()
    return {"context": context, "chunk": chunk, "kv_bytes": kv, "peak_bytes_above_model": peak}
