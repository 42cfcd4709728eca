# Fused decode step (Llama-3-8B shapes, random bf16, batch 8, 16k) with the layers' cache updates
# in line and on a second stream, same run, against the floor as `baklava-bench speed` computes it
# (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/overlap.py      (writes overlap.json to $OUT or /tmp)
import json, os, sys, torch
from baklava.bench.gpu_decode import (LLAMA3_8B, random_llama, uneven_capacities, filled_cache, model_shape,
                                      median_ms, copy_bandwidth, weight_bytes_read)
from baklava.runtime.attention import enable
from baklava.runtime import fused_decode
from baklava.eviction import EvictionConfig
from baklava.runtime.cuda_graph import DecodeGraph
bw = copy_bandwidth(); torch.cuda.empty_cache()
model = random_llama(LLAMA3_8B); enable(model); fused_decode.fuse(model)
W = weight_bytes_read(model)
L, H, _, _ = model_shape(model)
rows = []
for budget in (1.0, 0.3):
    cache = filled_cache(model, uneven_capacities(L, H, 16384, budget), 8, 16384, EvictionConfig())
    for rep in range(2):
        for ov in (False, True):
            g = DecodeGraph(model, cache, torch.zeros(8, dtype=torch.long, device="cuda"), 2, overlap_updates=ov)
            g.replay()
            ms = median_ms(g.replay, 30)
            floor = (W + cache.kv_bytes()) / bw * 1e3
            r = dict(budget=budget, overlap=ov, rep=rep, step_ms=ms, floor_ms=floor, over=ms / floor)
            print(json.dumps(r), flush=True); rows.append(r)
            del g; torch.cuda.empty_cache()
    del cache; torch.cuda.empty_cache()
json.dump(dict(bandwidth=bw, weights=W, rows=rows), open(os.environ.get("OUT", "/tmp") + "/overlap.json", "w"), indent=1)
