"""End-to-end decode step on the GPU: the runtime against its bandwidth floor and plain transformers.

The model is Llama-3-8B-shaped with random bf16 weights (a decode step's time does not depend on
the weights) or a real one; every sequence's cache is filled synthetically to ``context`` tokens
(uneven per-head capacities like a BaKlaVa allocation, every head full, so every step evicts).
For each budget the whole step - forward, Triton decode attention, Triton cache update, argmax -
is one CUDA graph (:class:`~baklava.runtime.cuda_graph.DecodeGraph`), timed with CUDA events,
first with transformers' decoder layers, then with the fused one-token layer forward
(:mod:`baklava.runtime.fused_decode`), in the same run.

The floor of a step is the bytes it must read, ``(weights read + kept KV) / bandwidth``, with the
bandwidth measured in the same run (a device-to-device copy: bytes read + written / time).
Plain transformers (SDPA, ``DynamicCache`` holding the whole context) is timed eagerly, as a user
runs it.
"""

from __future__ import annotations

import numpy as np
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import fused_decode
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.cuda_graph import DecodeGraph
from baklava.runtime.packed_cache import BudgetedCache
from baklava.runtime.packed_decode import SlotMap

LLAMA3_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


QWEN25_05B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# the random-weight models the GPU benchmarks take for --model (timing does not depend on weights)
RANDOM_MODELS = {"random-llama-3-8b": LLAMA3_8B, "random-qwen2.5-0.5b": QWEN25_05B}


def random_decoder(shape: dict, *, dtype=torch.bfloat16, device="cuda"):
    """A transformers decoder of ``shape`` (its ``model_type`` and config fields) with random
    weights, built directly in ``dtype`` on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def model_shape(model) -> tuple[int, int, int, int]:
    """``(layers, kv_heads, q_heads, head_dim)`` of a transformers decoder."""
    cfg = model.config
    q_heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return cfg.num_hidden_layers, kv, q_heads, head_dim


def uneven_capacities(layers: int, kv_heads: int, context: int, budget: float, seed: int = 0) -> np.ndarray:
    """``[L, H_kv]`` capacities with a log-normal spread (like a BaKlaVa allocation), each in
    ``[1, context]``, summing to ``budget * context`` per head on average (exactly ``context``
    everywhere at budget 1)."""
    gen = np.random.default_rng(seed)
    n = layers * kv_heads
    total = round(budget * context * n)
    if total >= n * context:
        return np.full((layers, kv_heads), context, dtype=np.int64)
    w = np.exp(0.6 * gen.standard_normal(n))
    caps = np.clip(np.round(w / w.sum() * total), 1, context).astype(np.int64)
    while caps.sum() != total:  # put the rounding and clipping remainder where there is room
        i = int(np.argmin(caps) if caps.sum() > total else np.argmax(context - caps))
        caps[i] += 1 if caps.sum() < total else -1
        caps[i] = min(max(caps[i], 1), context)
    return caps.reshape(layers, kv_heads)


def filled_cache(
    model, capacities: np.ndarray, batch: int, context: int, eviction: EvictionConfig
) -> BudgetedCache:
    """A cache for ``batch`` sequences of ``context`` tokens, every head full with random keys."""
    layers, kv_heads, _, head_dim = model_shape(model)
    param = next(model.parameters())
    cache = BudgetedCache(capacities, eviction)
    for layer in cache.layers:
        empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=param.dtype, device=param.device)
        layer.lazy_initialization(empty, empty)
        layer.keys.normal_()
        layer.values.normal_()
        caps = torch.tensor(layer.capacities, device=param.device)
        layer.fill.copy_(caps.expand(batch, -1))
        slots = SlotMap(
            layer.capacities, param.device
        )  # local: the layer itself never builds one on the GPU path
        rank = slots.rank  # a head of cap c holds c distinct positions spread over the context
        cap_of = caps[slots.head]
        pos = (rank * context) // cap_of
        layer.positions.copy_(pos.expand(batch, -1))
        layer.scores.uniform_(0, 1e-2)
        layer.valid_seen.fill_(context)
        layer.seen = context
    return cache


def weight_bytes_read(model) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table (only ``B``
    rows of it are read), unless it is tied to the output projection."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total if tied else total - embed.numel() * embed.element_size()


def median_ms(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` on the current stream, timed with CUDA events."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + written), median of 10."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = median_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms / 1e3)


def runtime_step(
    model,
    *,
    batch: int,
    context: int,
    budget: float,
    eviction: EvictionConfig,
    fused: bool = False,
    iters: int = 20,
) -> dict:
    """Median ms of one CUDA-graph decode step of the runtime at ``budget``; ``fused`` switches the
    model to the fused layer forward first (for good: the weights become views of fused ones)."""
    if fused and not fused_decode.fuse(model):
        raise ValueError(f"fused decode does not apply: {fused_decode.supported(model)}")
    layers, kv_heads, _, _ = model_shape(model)
    caps = uneven_capacities(layers, kv_heads, context, budget)
    cache = filled_cache(model, caps, batch, context, eviction)
    first = torch.zeros(batch, dtype=torch.long, device=next(model.parameters()).device)
    graph = DecodeGraph(model, cache, first, steps=2)
    graph.replay()
    ms = median_ms(graph.replay, iters)
    return {
        "budget": budget,
        "fused": fused,
        "kv_bytes": cache.kv_bytes(),
        "step_ms": ms,
        "tokens_per_s": batch / (ms / 1e3),
    }


@torch.inference_mode()
def transformers_step(model, *, batch: int, context: int, iters: int = 10) -> dict:
    """Median ms of one eager decode step of plain transformers (SDPA, ``DynamicCache``)."""
    from transformers import DynamicCache

    layers, kv_heads, _, head_dim = model_shape(model)
    param = next(model.parameters())
    implementation = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    cache = DynamicCache()
    for i in range(layers):
        k = torch.randn(batch, kv_heads, context, head_dim, dtype=param.dtype, device=param.device)
        cache.update(k, torch.randn_like(k), i)
    token = torch.zeros(batch, 1, dtype=torch.long, device=param.device)
    try:
        model(input_ids=token, **forward_cache(model, cache))  # warm-up
        ms = median_ms(lambda: model(input_ids=token, **forward_cache(model, cache)), iters)
    finally:
        model.set_attn_implementation(implementation)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"budget": "transformers", "kv_bytes": kv, "step_ms": ms, "tokens_per_s": batch / (ms / 1e3)}


def budget_gains(rows: list[dict], weights: int) -> dict:
    """Speed-up of each budget < 1.0 over budget 1.0 against the ratio of bytes read, per layer
    variant (``"0.3"``: transformers' layers, ``"0.3 fused"``: fused); target >= 0.85."""
    gains = {}
    for variant in (False, True):
        by_budget = {r["budget"]: r for r in rows if r.get("fused") is variant}
        if 1.0 not in by_budget:
            continue
        full = by_budget[1.0]
        for budget, r in by_budget.items():
            if budget < 1.0:
                bytes_ratio = (weights + full["kv_bytes"]) / (weights + r["kv_bytes"])
                speedup = full["step_ms"] / r["step_ms"]
                gains[f"{budget}{' fused' if variant else ''}"] = {
                    "speedup_vs_1.0": speedup,
                    "bytes_ratio": bytes_ratio,
                    "speedup_over_bytes_ratio": speedup / bytes_ratio,
                }
    return gains


def decode_speed(
    model,
    *,
    batch: int,
    context: int,
    budgets,
    eviction: EvictionConfig | None = None,
    transformers: bool = True,
    fused: bool = True,
    progress=None,
) -> dict:
    """Rows for every budget (and plain transformers), each with its floor, all from one run."""
    eviction = eviction or EvictionConfig()
    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()
    weights = weight_bytes_read(model)
    runs = []
    if transformers:  # first: it needs the model's own layer forward
        runs.append(lambda: transformers_step(model, batch=batch, context=context))
    step = dict(model=model, batch=batch, context=context, eviction=eviction)
    runs += [lambda b=b: runtime_step(budget=b, **step) for b in budgets]
    if fused:
        runs += [lambda b=b: runtime_step(budget=b, fused=True, **step) for b in budgets]
    rows = []
    for run in runs:
        rows.append(run())
        torch.cuda.empty_cache()  # each run's cache is gone once it returns
        if progress:
            progress(rows[-1])
    for row in rows:
        row["floor_ms"] = (weights + row["kv_bytes"]) / bandwidth * 1e3
        row["over_floor"] = row["step_ms"] / row["floor_ms"]
    gains = budget_gains(rows, weights)
    return {
        "batch": batch,
        "context": context,
        "weight_bytes_read": weights,
        "copy_bandwidth_Bps": bandwidth,
        "rows": rows,
        "gains": gains,
    }
