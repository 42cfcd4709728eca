"""Where one engine decode step's time goes, on the engine's own pool and CUDA graphs.

Random Llama-3-8B, budget 0.3 of 4,608 tokens (``uneven_capacities``), a 40 GiB pool of
``--kv-dtype``, every row full (fill = cap, random payload). Prints graph-replay milliseconds for
a bucket of ``n`` rows with ``m`` of them decoded, then ``torch.profiler``'s device time of three
eager steps over every row, kernel by kernel::

    python benchmarks/gpu/step_profile.py int8

(The profile quoted in BENCHMARKS.md, "The projections past 16 rows", ran this code before
``fused_decode.GEMV_ROWS`` existed: its projections were all ``_gemv_kernel``.)
"""

from __future__ import annotations

import json
import time

import click
import torch
from torch.profiler import ProfilerActivity, profile

from baklava.bench.gpu_decode import RANDOM_MODELS, model_shape, random_decoder, uneven_capacities
from baklava.eviction import EvictionConfig
from baklava.runtime.engine import Engine


def _fill_every_row(pool) -> None:
    for layer in pool.cache.layers:
        caps = torch.tensor(layer.capacities, dtype=layer.fill.dtype, device=layer.fill.device)
        layer.fill.copy_(caps.expand_as(layer.fill))
        layer.valid_seen.fill_(3000)
        slots = torch.arange(layer.positions.shape[1], device=layer.positions.device)
        layer.positions.copy_(slots.expand_as(layer.positions))
        for name in layer.slot_names:
            t = getattr(layer, name)
            if t.dtype in (torch.bfloat16, torch.float16):
                t.normal_(0, 0.5)
            elif t.dtype == torch.int8:
                t.random_(-100, 100)
            else:
                t.random_(0, 100)


def _replay_ms(engine, tokens, n: int, m: int, reps: int = 10) -> float:
    """Milliseconds a replay of bucket ``n``'s graph with rows ``0 .. m-1`` decoded."""
    pool = engine.pool
    pool.step_rows.zero_()
    pool.step_rows[:m] = True
    for layer in pool.cache.layers:
        layer.valid_seen.fill_(3000)
    engine.step_fn(n, tokens[:n])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        engine.step_fn(n, tokens[:n])
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / reps, 3)


@click.command()
@click.argument("kv_dtype", default="int8")
@click.option("--kv-memory-gib", default=40, show_default=True)
def main(kv_dtype: str, kv_memory_gib: int) -> None:
    model = random_decoder(RANDOM_MODELS["random-llama-3-8b"])
    layers, kv_heads, _, _ = model_shape(model)
    caps = uneven_capacities(layers, kv_heads, 4608, 0.3)
    engine = Engine.from_capacities(
        model, None, caps, EvictionConfig(), chat=False, kv_format=kv_dtype, kv_memory=kv_memory_gib << 30
    )
    pool, rows = engine.pool, engine.pool.rows
    _fill_every_row(pool)
    tokens = torch.randint(0, 1000, (rows,), device="cuda")
    start = time.time()
    engine.step_fn.capture_all()
    out = {"capture_s": round(time.time() - start, 1), "rows": rows, "graph_ms": {}}
    for n in sorted(x for x in {1, 64, 128, rows // 2, rows} if 1 <= x <= rows):
        bucket = engine.step_fn.bucket(n)
        for m in sorted(x for x in {n // 2, n} if x >= 1):
            out["graph_ms"][f"bucket {bucket} decoded {m}"] = _replay_ms(engine, tokens, bucket, m)
    print(kv_dtype, json.dumps(out), flush=True)

    pool.step_rows.fill_(True)
    with torch.inference_mode():
        engine.step_fn.tokens[:rows, 0].copy_(tokens)
        for _ in range(2):
            engine.step_fn._forward(rows, None)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step_fn._forward(rows, None)
            torch.cuda.synchronize()
    print(f"{kv_dtype} eager step over {rows} rows, 3 steps:")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
