# The q/k/v and gate/up projections with and without decode_gemv's RMSNorm prologue over block /
# pipeline configurations (batch 8, Llama-3-8B shapes, CUDA graph, 4 weights rotated). GPU machine:
#   python benchmarks/gpu/norm_prologue.py   (writes norm-prologue.json to $OUT or /tmp)
import json, os, torch, triton
import torch.nn.functional as F
import numpy as np
from baklava.kernels import decode_gemv as dg
def median_ms(fn, iters):
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return float(np.median(ts))
def graph_us(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    return median_ms(g.replay, 15) / reps * 1e3
B, dev, dt = 8, "cuda", torch.bfloat16
res = {}
for name, (N, K, epi) in {"qkv": (6144, 4096, 0), "gate_up": (28672, 4096, 2)}.items():
    ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.01 for _ in range(4)]
    i = [0]
    def nxt():
        i[0] = (i[0] + 1) % 4; return ws[i[0]]
    x = torch.randn(B, K, device=dev, dtype=dt); nw = torch.rand(K, device=dev, dtype=dt) + 0.5
    ss = torch.cat([dg.sum_squares(x) / 128] * 128)
    cols = N // (2 if epi == 2 else 1)
    y = x.new_empty(B, cols)
    rows = []
    for bn in (32, 64):
        for bk, st in ((256, 3), (256, 2), (128, 3), (128, 4), (64, 6), (64, 4)):
            for norm in (True, False):
                def f():
                    dg._gemv_kernel[(cols // bn, 1)](x, nxt(), ws[0], nw, ss, y, y, y, B, cols, K, 128, 1e-5,
                        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SS_PAD=128, NORM=norm, EPI=epi, HAS_BIAS=False, num_warps=4, num_stages=st)
                try:
                    rows.append((graph_us(f), bn, bk, st, norm))
                except Exception as e:
                    print(name, bn, bk, st, norm, repr(e)[:100], flush=True)
    rows.sort()
    res[name] = rows
    print(name, "norm:", [r for r in rows if r[4]][:4], "plain:", [r for r in rows if not r[4]][:2], flush=True)
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/norm-prologue.json", "w"), indent=1)
