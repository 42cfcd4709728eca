# Kernel time per fused CUDA-graph decode step and each stream's busy time and span (Llama-3-8B
# shapes, random bf16, batch 8, 16k, budget 0.3). GPU machine: python benchmarks/gpu/step_profile.py
import json, os, collections, torch
from baklava.bench import gpu_decode as gd
from baklava.runtime import fused_decode
from baklava.runtime.cuda_graph import DecodeGraph
from baklava.eviction import EvictionConfig
from baklava.runtime.attention import enable
model = gd.random_llama(gd.LLAMA3_8B)
enable(model)
fused_decode.fuse(model)
layers, kv, _, _ = gd.model_shape(model)
caps = gd.uneven_capacities(layers, kv, 16384, 0.3)
cache = gd.filled_cache(model, caps, 8, 16384, EvictionConfig())
torch.set_grad_enabled(False)
graph = DecodeGraph(model, cache, torch.zeros(8, dtype=torch.long, device="cuda"), steps=2)
for _ in range(3): graph.replay()
torch.cuda.synchronize()
print("step ms", gd.median_ms(graph.replay, 20))
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(5): graph.replay()
    torch.cuda.synchronize()
ev = [e for e in p.events() if e.device_type.name == "CUDA"]
agg = collections.defaultdict(lambda: [0, 0.0])
for e in ev:
    agg[e.name][0] += 1; agg[e.name][1] += e.device_time / 1e3  # ms
rows = sorted(((v[1] / 5, v[0] // 5, k[:90]) for k, v in agg.items()), reverse=True)
for r in rows: print(f"{r[0]:8.3f} ms {r[1]:5d}x {r[2]}")
# gaps on the main stream: sort by stream
by_stream = collections.defaultdict(list)
for e in ev:
    by_stream[getattr(e, "device_resource_id", 0)].append((e.time_range.start, e.time_range.end, e.name))
for s, lst in by_stream.items():
    lst.sort(); busy = sum(b - a for a, b, _ in lst) / 5 / 1e3; span = (lst[-1][1] - lst[0][0]) / 5 / 1e3
    print("stream", s, "kernels", len(lst) // 5, "busy ms", round(busy, 3), "span ms", round(span, 3))
json.dump(rows, open(os.environ.get("OUT", "/tmp") + "/step-profile.json", "w"), indent=1)
