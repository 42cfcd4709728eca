# cuBLAS at batch 8 on the four Llama-3-8B weight shapes: F.linear against the transposed problem,
# in-place addmm and the other bf16 reduction setting (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/gemv_orientation.py      (writes gemv_orient.json to $OUT or /tmp)
import json, os, torch
import torch.nn.functional as F
from baklava.bench.gpu_decode import median_ms
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
res = {}
def timed(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(16): fn()
    g.replay(); torch.cuda.synchronize()
    return median_ms(g.replay, 20) / 16 * 1e3
for name, (N, K) in shapes.items():
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    res_x = torch.randn(8, N, device="cuda", dtype=torch.bfloat16)
    outT = torch.empty(N, 8, device="cuda", dtype=torch.bfloat16)
    i = [0]
    def w():
        i[0] = (i[0] + 1) % 4; return ws[i[0]]
    r = {}
    r["linear"] = timed(lambda: F.linear(x, w()))
    r["mm_WxT"] = timed(lambda: torch.mm(w(), x.t()))
    r["mm_WxT_out"] = timed(lambda: torch.mm(w(), x.t(), out=outT))
    r["addmm_inplace"] = timed(lambda: res_x.addmm_(x, w().t()))
    r["addmm_T_inplace"] = timed(lambda: res_x.t().addmm_(w(), x.t()))
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    r["linear_flip_reduced_prec"] = timed(lambda: F.linear(x, w()))
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    r = {k: round(v, 2) for k, v in r.items()}
    r["ideal_us_at_3TBps"] = round(N * K * 2 / 3e12 * 1e6, 2)
    print(name, json.dumps(r), flush=True); res[name] = r
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/gemv_orient.json", "w"), indent=1)
