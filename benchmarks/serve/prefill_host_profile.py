"""Where the engine's prefill spends host time, by Python function (cProfile), per budget.

Serves prompts of 1k-16k tokens (Qwen2.5-0.5B shapes, random bf16 weights) for one token each, so
only prefill runs: first 12 without the profiler (ms a prompt, GPU included), then 12 under
cProfile, whose tables (by own time and by cumulative time) say which calls hold the host. A call
that only waits for a full launch queue (the GPU is the bound) shows up as slow too: at budget
1.0 on an H100 the matmuls took 119 us of host time a call, at 0.3 52 us (BENCHMARKS.md, "A fused
prefill layer")::

    python benchmarks/serve/prefill_host_profile.py --budgets 1.0,0.3 > profile.txt   # GPU machine
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import click
import numpy as np
import torch

from baklava.bench.gpu_decode import QWEN25_05B, random_decoder, uneven_capacities
from baklava.eviction import EvictionConfig
from baklava.runtime.engine import Engine
from baklava.runtime.sampling import SamplingParams


@click.command()
@click.option("--budgets", default="1.0,0.3", show_default=True)
def main(budgets: str) -> None:
    torch.manual_seed(0)
    model = random_decoder(QWEN25_05B)
    source = np.random.default_rng(0).integers(0, QWEN25_05B["vocab_size"], 1 << 20)
    lengths = np.random.default_rng(1).integers(1024, 16384, 28)
    prompts = [source[i * 20000 : i * 20000 + int(n)].tolist() for i, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    layers, kv_heads = QWEN25_05B["num_hidden_layers"], QWEN25_05B["num_key_value_heads"]
    for budget in (float(b) for b in budgets.split(",")):
        caps = uneven_capacities(layers, kv_heads, 16640, budget)
        engine = Engine.from_capacities(
            model, None, caps, EvictionConfig(), chat=False, max_batch=32,
            prefill_chunk=16384, max_prefill_tokens=16384,
        )  # fmt: skip
        engine.warm_up()
        engine.generate(prompts[:4], params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts[4:16], params)
        torch.cuda.synchronize()
        print(f"budget {budget}: {1000 * (time.perf_counter() - start) / 12:.1f} ms a prompt (no profiler)")
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        engine.generate(prompts[16:], params)
        torch.cuda.synchronize()
        profiler.disable()
        print(f"budget {budget}: {1000 * (time.perf_counter() - start) / 12:.1f} ms a prompt (cProfile)")
        for key, rows in (("tottime", 40), ("cumtime", 60)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(rows)
            print(text.getvalue())
        del engine


if __name__ == "__main__":
    main()
