"""What the prefill commit kernel costs per layer, Qwen2.5-0.5B shapes (a diagnostic, not a benchmark).

    python benchmarks/serve/commit_kernel.py

One row of a slot pool (2 KV heads, head dim 64), a first chunk of S tokens: heads that keep
everything (budget 1.0: capacity >= S) and heads that evict (capacities 3000 / 7000), at priority
blocks of 256, 1024 and 2048 candidates. Prints milliseconds a layer (the commit writes in place:
every call after the first commits onto a full cache).
"""

import torch

from baklava.eviction import EvictionConfig
from baklava.kernels.prefill_select import packed_prefill_select
from baklava.runtime.packed_cache import BudgetedLayer


def case(caps, s, block, reps=20):
    layer = BudgetedLayer(caps, EvictionConfig())
    empty = torch.empty(1, len(caps), 0, 64, dtype=torch.bfloat16, device="cuda")
    layer.lazy_initialization(empty, empty)
    kn = torch.randn(1, len(caps), s, 64, dtype=torch.bfloat16, device="cuda")
    valid = torch.ones(1, s, dtype=torch.bool, device="cuda")
    new_pos = torch.arange(s, device="cuda")[None]
    new_scores = torch.rand(1, len(caps), s, device="cuda")
    offsets = torch.tensor(layer.offsets, dtype=torch.int32, device="cuda")

    def run():
        return packed_prefill_select(
            [(layer.keys, layer.values, kn, kn)], layer.positions, layer.scores, layer.fill, new_pos,
            new_scores, valid, torch.tensor([s], device="cuda"), caps, offsets, sink=4, window=32,
            policy="h2o", block=block,
        )  # fmt: skip

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for s in (2048, 8192, 16384):
    for name, caps in (("keeps all", [16640, 16640]), ("evicts", [3000, 7000])):
        for block in (256, 1024, 2048):
            print(f"S={s:6d} {name:9s} block {block:4d}: {case(caps, s, block):8.3f} ms", flush=True)
