# Merge launch of the decode attention: tiles read per block x warps per program, at the
# kernel_speed cases + batch 32 / 8k (budget 0.3); each configuration's full call timed in CUDA
# graphs twice, and the merge kernel alone from torch.profiler (merge_us). GPU machine:
#   python benchmarks/gpu/merge_sweep.py   (writes merge-sweep.json to $OUT or /tmp)
import json, os, math, itertools, torch
from baklava.bench import kernel_speed as ks
from baklava.trt_plugins import triton_decode_attention as tda
from torch.profiler import profile, ProfilerActivity
dev, dt = "cuda", torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
out = []
for batch, context, budget in ks.CASES + [(32, 8192, 0.3)]:
    case = ks.packed_case(batch, context, budget, dev, dt); caps, q = case.caps, case.query
    tile = tda.tile_length(caps, batch, 64, sms); tab = (tile, tda.tile_table(caps, tile, dev))
    maxc = max(math.ceil(c / tile) for c in caps)
    nbytes = 2 * case.keys.numel() * 2
    kd, vd = case.dense_same()
    sbytes = 2 * kd.numel() * 2
    ref = tda.packed_decode_attention(*case.args(), table=tab)
    row = {"batch": batch, "context": context, "budget": budget, "tile": tile, "max_tiles_per_head": maxc, "configs": {}}
    t_same = [ks._best_sdpa(q[:, :, None], kd, vd)[0]]
    for mb, mw in itertools.product((4, 8, 16, 32, 64), (1, 2, 4)):
        fn = lambda: tda.packed_decode_attention(*case.args(), table=tab, merge_block=mb, merge_warps=mw)
        diff = float((fn().float() - ref.float()).abs().max())
        ts = [ks._time(fn) for _ in range(2)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10): fn()
            torch.cuda.synchronize()
        comb = [e.device_time_total / e.count for e in prof.key_averages() if "_combine" in e.key]
        row["configs"][f"{mb}/{mw}"] = {"ms": [round(t * 1e3, 4) for t in ts], "merge_us": round(comb[0], 2) if comb else None, "maxdiff": diff}
    t_same.append(ks._best_sdpa(q[:, :, None], kd, vd)[0])
    ts_ = min(t_same)
    row["sdpa_same_ms"] = [round(t * 1e3, 4) for t in t_same]
    for k, v in row["configs"].items():
        v["ratio"] = round((nbytes / min(v["ms"]) * 1e3) / (sbytes / ts_), 3)
    best = sorted(row["configs"].items(), key=lambda kv: -kv[1]["ratio"])
    print(json.dumps({k: row[k] for k in ("batch", "context", "budget", "tile", "max_tiles_per_head", "sdpa_same_ms")}), flush=True)
    for k, v in best: print("   ", k, v, flush=True)
    out.append(row)
    case = kd = vd = None  # free this case's tensors before the next one
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/merge-sweep.json", "w"), indent=1)
