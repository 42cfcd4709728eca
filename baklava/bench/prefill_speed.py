"""Time to first token: the budgeted prefill against transformers' own, on one GPU, in one run.

For every context S (one random prompt of S tokens)::

    transformers sdpa, one pass       model(ids, DynamicCache)              the reference
    baklava, budget b, one pass       prefill(model, BudgetedCache, ids)
    baklava, budget b, chunk C        prefill(..., chunk=C): the cache evicts after every chunk;
                                      later chunks by kernels/prefill_attention.py (on CUDA)
    (sdpa=True) SDPA per head         the same chunks through one SDPA call per KV head (the
                                      kernels' reference, what ran before them)

each timed from the first forward to the last token's logits (synchronised; one warm-up, then
the best of ``repeats``), with the peak GPU memory above the weights and the KV bytes the cache
holds at the end. Capacities are ``budget`` of S per head on average, spread as an allocation
spreads them (:func:`baklava.bench.gpu_decode.uneven_capacities`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from baklava.bench.gpu_decode import model_shape, uneven_capacities
from baklava.eviction import EvictionConfig
from baklava.runtime.attention import enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.generate import prefill
from baklava.runtime.packed_cache import BudgetedCache, BudgetedLayer

DEPLOYED = BudgetedLayer.prefill_kernel  # the runtime's default, restored after each variant


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """``(best seconds, peak GiB above what was allocated before, last result)`` of ``fn``."""
    fn()  # warm-up: kernels compile, the allocator grows
    best, result = float("inf"), None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        result = None  # the previous cache is freed before the next one is built
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, (torch.cuda.max_memory_allocated() - base) / 2**30, result


def kv_gib(cache) -> float:
    if isinstance(cache, BudgetedCache):
        return cache.kv_bytes() / 2**30
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / 2**30


@torch.inference_mode()
def prefill_speed(
    model,
    *,
    contexts: list[int],
    budgets: list[float],
    chunks: list[int | None],
    sdpa: bool = False,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows of the module docstring's table, one per (context, system, budget, chunk)."""
    from transformers import DynamicCache

    layers, kv_heads, _, _ = model_shape(model)
    vocab = model.config.vocab_size
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        if progress:
            progress(row)

    for context in contexts:
        ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed)).cuda()
        model.set_attn_implementation("sdpa")

        def dense(ids=ids):
            cache = DynamicCache()
            model(input_ids=ids, **forward_cache(model, cache), logits_to_keep=1)
            return cache

        ref, peak, cache = timed(dense, repeats)
        report(_row(context, "transformers sdpa", 1.0, None, ref, ref, peak, kv_gib(cache)))
        del cache
        enable(model)
        for budget in budgets:
            caps = uneven_capacities(layers, kv_heads, context, budget, seed)
            for chunk in chunks:

                def budgeted(ids=ids, caps=caps, chunk=chunk):
                    cache = BudgetedCache(caps, EvictionConfig())
                    prefill(model, cache, ids, chunk=chunk)
                    return cache

                # the deployed path (later chunks through the Triton prefill kernels), and, with
                # ``sdpa``, the per-KV-head SDPA path they replaced (their reference)
                variants = [("baklava", True)]
                if sdpa and chunk is not None:
                    variants.append(("baklava, SDPA per head", False))
                for system, use_kernel in variants:
                    BudgetedLayer.prefill_kernel = use_kernel
                    try:
                        seconds, peak, cache = timed(budgeted, repeats)
                    finally:
                        BudgetedLayer.prefill_kernel = DEPLOYED
                    report(_row(context, system, budget, chunk, seconds, ref, peak, kv_gib(cache)))
                    del cache
    return rows


def _row(context, system, budget, chunk, seconds, reference, peak, kv) -> dict:
    return {
        "context": context,
        "system": system,
        "budget": budget,
        "chunk": chunk,
        "ttft_s": round(seconds, 4),
        "x_transformers": round(seconds / reference, 3),
        "peak_above_weights_gib": round(peak, 3),
        "kv_gib": round(kv, 3),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Prefill (time to first token), {meta.get('model')} on {meta.get('gpu')}, {meta.get('date')}",
        "",
        "| context | system | budget | chunk | TTFT s | x transformers | peak above weights GiB | KV GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['system']} | {r['budget']} | {r['chunk'] or 'one pass'} | "
            f"{r['ttft_s']} | {r['x_transformers']} | {r['peak_above_weights_gib']} | {r['kv_gib']} |"
        )
    return "\n".join(lines) + "\n"
