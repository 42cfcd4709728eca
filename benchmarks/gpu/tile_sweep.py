# decode-attention launch configuration at batch 64 / 4k and 16 / 16k (budget 0.3): tiles per SM,
# block, warps, stages; the dense-SDPA reference timed in the same run. GPU machine:
#   python benchmarks/gpu/tile_sweep.py   (writes tile-sweep.json to $OUT or /tmp)
import itertools, json, os, torch
from baklava.bench import kernel_speed as ks
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table
dev, dt = "cuda", torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
res = {}
for batch, context in ((64, 4096), (16, 16384)):
    case = ks.packed_case(batch, context, 0.3, dev, dt); caps, q = case.caps, case.query
    nbytes = 2 * case.keys.numel() * 2
    kd, vd = case.dense_same()
    t_same, _ = ks._best_sdpa(q[:, :, None], kd, vd)
    sbytes = 2 * kd.numel() * 2; del kd, vd
    rows = []
    for per_sm, bn, warps, stages in itertools.product((4, 8, 12, 16, 32), (32, 64), (4, 8), (2, 3)):
        tile = tile_length(caps, batch, bn, sms, per_sm)
        table = (tile, tile_table(caps, tile, dev))
        t = ks._time(lambda: packed_decode_attention(*case.args(), table=table, block_n=bn, num_warps=warps, num_stages=stages))
        rows.append((round((nbytes / t) / (sbytes / t_same), 3), per_sm, bn, warps, stages, tile, round(t * 1e3, 4)))
    t_same2, _ = ks._best_sdpa(q[:, :, None], *case.dense_same())
    rows.sort(reverse=True)
    default = tile_length(caps, batch, 64, sms)
    res[f"{batch}/{context}"] = {"sdpa_same_ms": [t_same * 1e3, t_same2 * 1e3], "default_tile": default, "top": rows[:8], "all": rows}
    print(batch, context, "sdpa", t_same * 1e3, t_same2 * 1e3, "default tile", default, flush=True)
    for r in rows[:8]: print("  ", r, flush=True)
    print("   default-like:", [r for r in rows if r[1] == (8 if batch > 16 else 4) and r[2] == 64 and r[3] == 4 and r[4] == 2], flush=True)
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/tile-sweep.json", "w"), indent=1)
