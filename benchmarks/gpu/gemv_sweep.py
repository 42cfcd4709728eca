# GEMV bandwidth at batch 8 on the four Llama-3-8B weight shapes: cuBLAS (F.linear) against a
# Triton tl.dot GEMV over a small configuration sweep (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/gemv_sweep.py      (writes gemv.json to $OUT or the current directory)
import itertools, json, os, torch, triton, triton.language as tl
import torch.nn.functional as F

@triton.jit
def _gemv(X, W, Y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    span = K // SPLIT
    for k in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=rm[:, None] < M, other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :])
        acc += tl.dot(x, tl.trans(w))
    if SPLIT == 1:
        tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=rm[:, None] < M)
    else:
        tl.atomic_add(Y + rm[:, None] * N + rn[None, :], acc, mask=rm[:, None] < M)

def gemv(x, w, bn, bk, split, warps, stages, out=None):
    M, K = x.shape; N = w.shape[0]
    if split == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        y = out; y.zero_()
    _gemv[(N // bn, split)](x, w, y, M, N, K, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, num_warps=warps, num_stages=stages)
    return y

def timed(fn, iters=200):
    g = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(20): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 20)
    return sorted(ts)[len(ts) // 2] * 1e3  # us

res = {}
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
for name, (N, K) in shapes.items():
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # rotate: no L2 reuse
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    i = [0]
    def nxt():
        i[0] = (i[0] + 1) % 4; return ws[i[0]]
    base = timed(lambda: F.linear(x, nxt()))
    ref = F.linear(x.float(), ws[0].float())
    best = None
    for bn, bk, split, warps, stages in itertools.product((16, 32, 64), (128, 256), (1, 2), (4, 8), (4,)):
        if N % bn or K % (bk * split): continue
        try:
            out = torch.zeros(8, N, device="cuda", dtype=torch.float32)
            y = gemv(x, ws[0], bn, bk, split, warps, stages, out)
            if (y.float() - ref).abs().max() > 0.5: continue
            t = timed(lambda: gemv(x, nxt(), bn, bk, split, warps, stages, out))
        except Exception as e:
            continue
        if best is None or t < best[0]: best = (t, bn, bk, split, warps, stages)
    nbytes = N * K * 2
    res[name] = {"cublas_us": base, "cublas_TBps": nbytes / base / 1e6, "triton_best": best, "triton_TBps": nbytes / best[0] / 1e6}
    print(name, json.dumps(res[name]), flush=True)
json.dump(res, open(os.environ.get("OUT", ".") + "/gemv.json", "w"), indent=1)
