# Block size and warps of the cache update's score pass, timed in the fused decode step (Llama-3-8B
# shapes, batch 8, 16k, budgets 1.0 and 0.3). GPU machine: python benchmarks/gpu/score_sweep.py
import json, os, torch
from baklava.bench import gpu_decode as g
from baklava.runtime import fused_decode
from baklava.runtime.attention import enable
from baklava.trt_plugins import triton_cache_update as u
from baklava.eviction import EvictionConfig
model = g.random_llama(g.LLAMA3_8B); enable(model); fused_decode.fuse(model)
bw = g.copy_bandwidth(); torch.cuda.empty_cache(); w = g.weight_bytes_read(model)
rows = []
for rep in range(2):
    for block, warps in ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8), (512, 8)):
        u.packed_cache_update.__kwdefaults__.update(block=block, warps=warps)
        for b in (1.0, 0.3):
            r = g.runtime_step(model, batch=8, context=16384, budget=b, eviction=EvictionConfig(), fused=True)
            torch.cuda.empty_cache()
            r.update(block=block, warps=warps, rep=rep, floor_ms=(w + r["kv_bytes"]) / bw * 1e3)
            r["over_floor"] = r["step_ms"] / r["floor_ms"]
            rows.append(r); print(rep, block, warps, b, round(r["step_ms"], 3), round(r["over_floor"], 3), flush=True)
json.dump({"bandwidth": bw, "weights": w, "rows": rows}, open(os.environ.get("OUT", ".") + "/score_sweep.json", "w"), indent=1)
