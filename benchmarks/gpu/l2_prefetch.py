# Attention + o GEMV over 32 layers with and without a side-stream kernel reading the next o weight
# into L2 during the attention (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/l2_prefetch.py      (writes prefetch.json to $OUT or /tmp)
import json, os, torch, triton, triton.language as tl
import torch.nn.functional as F
from baklava.bench.gpu_decode import uneven_capacities, median_ms
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table

@triton.jit
def _touch(W, OUT, n, BLOCK: tl.constexpr, POLICY: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < n, other=0.0, eviction_policy=POLICY).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))

B, CTX, L, HKV, HQ, D = 8, 16384, 32, 8, 32, 128
dev, dt = "cuda", torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
res = {}
for budget in (0.3, 1.0):
    caps_all = uneven_capacities(L, HKV, CTX, budget)
    layers = []
    for caps in caps_all.tolist():
        total = sum(caps)
        keys, values = (torch.randn(B, total, D, device=dev, dtype=dt) for _ in range(2))
        fill = torch.tensor([caps] * B, dtype=torch.int64, device=dev)
        offsets = torch.tensor([sum(caps[:i]) for i in range(HKV)], dtype=torch.int32, device=dev)
        logits = torch.empty(B, total, HQ // HKV, device=dev)
        lse = torch.empty(B, HQ, device=dev); ln = torch.empty(B, HQ, device=dev)
        wo = torch.randn(4096, 4096, device=dev, dtype=dt) * 0.01
        tile = tile_length(caps, B, 64, sms)
        layers.append((caps, keys, values, fill, offsets, logits, lse, ln, wo, (tile, tile_table(caps, tile, dev))))
    q = torch.randn(B, HQ, D, device=dev, dtype=dt)
    kn, vn = (torch.randn(B, HKV, D, device=dev, dtype=dt) for _ in range(2))
    side = torch.cuda.Stream()
    dummy = torch.empty(4096, device=dev)
    def run(mode, programs=132, policy="evict_last"):
        for caps, k, v, f, o, lg, ls, l2, wo, table in layers:
            if mode == "prefetch":
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    _touch[(programs,)](wo, dummy, wo.numel(), BLOCK=2048, POLICY=policy)
            out = packed_decode_attention(q, kn, vn, k, v, f, o, caps, D**-0.5, table=table, logits=lg, lse=ls, logit_new=l2)
            if mode == "prefetch":
                torch.cuda.current_stream().wait_stream(side)
            if mode != "attn_only":
                F.linear(out.reshape(B, -1), wo)
    out = {}
    for mode, kw in [("attn_only", {}), ("gemv_only", None), ("plain", {}), ("prefetch", dict(programs=132)), ("prefetch", dict(programs=32)), ("prefetch", dict(programs=16)), ("prefetch", dict(programs=32, policy="")), ("plain", {})]:
        if kw is None:
            fn = lambda: [F.linear(q.reshape(B, -1), l[8]) for l in layers]
        else:
            fn = lambda: run(mode, **kw)
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay(); torch.cuda.synchronize()
        ms = median_ms(g.replay, 20)
        key = f"{mode} {kw}"
        out[key] = ms
        print(budget, key, round(ms, 4), flush=True)
        del g
    res[budget] = out
    del layers; torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/prefetch.json", "w"), indent=1)
