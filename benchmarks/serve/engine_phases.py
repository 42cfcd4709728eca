"""Where a batching-engine run spends its time on the GPU, per budget (a diagnostic, not a benchmark).

    python benchmarks/serve/engine_phases.py 32

A random-weight model of Qwen2.5-0.5B's shapes, N requests (prompts 1k-4k tokens, 32 new tokens),
2 GiB of KV memory; for budgets 1.0 and 0.3 it prints the engine's admission / prefill / decode
seconds (synchronised around each phase) and how many files Triton's kernel cache gained (its
compilations). Found: budget 0.3 spent 51 s in prefill against 11 s at 1.0, with 208 new cache
files (BENCHMARKS.md, served throughput).
"""

import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baklava.bench.gpu_decode import QWEN25_05B, random_decoder, uneven_capacities  # noqa: E402
from baklava.bench.serve_engine import run_engine, workload  # noqa: E402
from baklava.runtime import engine as E  # noqa: E402


def main(requests: int) -> None:
    model = random_decoder(QWEN25_05B)
    phase: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(self, *args):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(self, *args)
            torch.cuda.synchronize()
            phase[name] = phase.get(name, 0) + time.perf_counter() - start
            return out

        return wrapper

    for name in ("_admit", "_prefill", "_decode"):
        setattr(E.Engine, name, timed(name, getattr(E.Engine, name)))
    work = workload(requests, (1024, 4096), (32, 32), np.arange(100, 50000), 0)

    def cache_files() -> int:
        return sum(len(files) for _, _, files in os.walk(os.environ["TRITON_CACHE_DIR"]))

    for budget in (1.0, 0.3):
        phase.clear()
        before, start = cache_files(), time.perf_counter()
        caps = uneven_capacities(24, 2, 4128, budget)
        engine = E.Engine.from_capacities(
            model, None, caps, kv_memory=2 << 30, prefill_chunk=2048, max_prefill_tokens=8192, chat=False
        )
        r = run_engine(engine, work, f"budget {budget}", False, budget=budget)
        seconds = {k: round(v, 2) for k, v in phase.items()}
        print(
            budget, "rows", r["rows"], "wall", r["wall_s"], "capture", r["capture_s"], "tok/s",
            r["tokens_per_s"], seconds, "new triton cache files", cache_files() - before,
            "total", round(time.perf_counter() - start, 1), flush=True,
        )  # fmt: skip
        del engine


if __name__ == "__main__":
    main(int(sys.argv[1]))
