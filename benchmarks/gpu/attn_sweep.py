# Decode-attention launch configurations over the 32 layers' packed caches of the end-to-end step
# (batch 8, 16k, uneven capacities, H2O logits stored), one CUDA graph per configuration
# (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/attn_sweep.py 0.3 1.0      (writes attn_sweep.json to $OUT or /tmp)
import itertools, json, os, sys, torch
from baklava.bench.gpu_decode import uneven_capacities, median_ms, copy_bandwidth
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table
B, CTX, L, HKV, HQ, D = 8, 16384, 32, 8, 32, 128
dev, dt = "cuda", torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
bw = copy_bandwidth(); torch.cuda.empty_cache()
out = {}
for budget in [float(b) for b in sys.argv[1:]]:
    caps_all = uneven_capacities(L, HKV, CTX, budget)
    layers = []
    for caps in caps_all.tolist():
        total = sum(caps)
        keys, values = (torch.randn(B, total, D, device=dev, dtype=dt) for _ in range(2))
        fill = torch.tensor([caps] * B, dtype=torch.int64, device=dev)
        offsets = torch.tensor([sum(caps[:i]) for i in range(HKV)], dtype=torch.int32, device=dev)
        logits = torch.empty(B, total, HQ // HKV, device=dev)
        lse = torch.empty(B, HQ, device=dev); ln = torch.empty(B, HQ, device=dev)
        layers.append((caps, keys, values, fill, offsets, logits, lse, ln))
    q = torch.randn(B, HQ, D, device=dev, dtype=dt)
    kn, vn = (torch.randn(B, HKV, D, device=dev, dtype=dt) for _ in range(2))
    nbytes = sum(l[1].numel() * 4 for l in layers)
    res = []
    for per_sm, block_n, warps, stages in itertools.product((2, 4, 8, 16), (32, 64, 128), (4, 8), (2, 3, 4)):
        calls = []
        for caps, keys, values, fill, offsets, logits, lse, ln in layers:
            tile = tile_length(caps, B, block_n, sms, per_sm)
            table = (tile, tile_table(caps, tile, dev))
            calls.append(lambda c=caps, k=keys, v=values, f=fill, o=offsets, lg=logits, ls=lse, l2=ln, t=table:
                packed_decode_attention(q, kn, vn, k, v, f, o, c, D**-0.5, table=t, logits=lg, lse=ls, logit_new=l2,
                                        block_n=block_n, num_warps=warps, num_stages=stages))
        try:
            for c in calls: c()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls: c()
            g.replay(); torch.cuda.synchronize()
            ms = median_ms(g.replay, 20)
        except Exception as e:
            print("fail", per_sm, block_n, warps, stages, type(e).__name__, flush=True); continue
        r = dict(per_sm=per_sm, block_n=block_n, warps=warps, stages=stages, ms=ms, TBps=nbytes / ms / 1e9, of_copy=nbytes / ms / 1e9 / (bw / 1e12))
        res.append(r); del g
    res.sort(key=lambda r: r["ms"])
    default = [r for r in res if r["per_sm"] == 4 and r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 2]
    print(json.dumps(dict(budget=budget, copy_TBps=bw / 1e12, default=default, best=res[:6])), flush=True)
    out[budget] = res
    del layers; torch.cuda.empty_cache()
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/attn_sweep.json", "w"), indent=1)
