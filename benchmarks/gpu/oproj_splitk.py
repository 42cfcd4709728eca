# o projection + residual add + RMSNorm over 32 layers (batch 8, Llama-3-8B shapes): cuBLAS and the
# fused add_rms_norm against a Triton split-K GEMV accumulating fp32 atomically, read and zeroed by an
# fp32-input add_rms_norm (BENCHMARKS.md, decode step). GPU machine:
#   python benchmarks/gpu/oproj_splitk.py      (writes oproj.json to $OUT or /tmp)
import itertools, json, os, torch, triton, triton.language as tl
import torch.nn.functional as F
from baklava.bench.gpu_decode import median_ms

@triton.jit
def _gemv_splitk(X, W, ACC, M, N, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0); pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    span = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    for k in range(pid_k * span, tl.minimum((pid_k + 1) * span, K), BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.atomic_add(ACC + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N), sem="relaxed")

@triton.jit
def _add_rms_norm_f32(X, ACC, Wt, XO, Y, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK); ok = offs < n
    o = tl.load(ACC + row * n + offs, mask=ok, other=0.0)
    tl.store(ACC + row * n + offs, tl.zeros_like(o), mask=ok)
    x = tl.load(X + row * n + offs, mask=ok, other=0.0)
    xo = (x.to(tl.float32) + o.to(x.dtype).to(tl.float32)).to(x.dtype)
    tl.store(XO + row * n + offs, xo, mask=ok)
    v = xo.to(tl.float32)
    var = tl.sum(v * v, 0) / n
    y = (v * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(Wt + offs, mask=ok, other=0.0)
    tl.store(Y + row * n + offs, w * y, mask=ok)

@triton.jit
def _add_rms_norm(X, ADD, Wt, XO, Y, n, eps, BLOCK: tl.constexpr):
    # the fused decode path's residual add + RMSNorm kernel as it was when this was measured
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK); ok = offs < n
    x = tl.load(X + row * n + offs, mask=ok, other=0.0)
    o = tl.load(ADD + row * n + offs, mask=ok, other=0.0)
    s = (x.to(tl.float32) + o.to(tl.float32)).to(x.dtype)
    tl.store(XO + row * n + offs, s, mask=ok)
    v = s.to(tl.float32)
    normed = (v * tl.rsqrt(tl.sum(v * v, 0) / n + eps)).to(x.dtype)
    w = tl.load(Wt + offs, mask=ok, other=0.0)
    tl.store(Y + row * n + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)

def add_rms_norm(x, o, w, eps):
    xo, y = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm[(x.shape[0],)](x, o, w, xo, y, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]))
    return xo, y

B, HID, L = 8, 4096, 32
dev, dt = "cuda", torch.bfloat16
ws = [torch.randn(HID, HID, device=dev, dtype=dt) * 0.02 for _ in range(L)]
norm_w = torch.ones(HID, device=dev, dtype=dt)
attn = torch.randn(B, HID, device=dev, dtype=dt)
x0 = torch.randn(B, HID, device=dev, dtype=dt)
acc = torch.zeros(B, HID, device=dev, dtype=torch.float32)
def base():
    x = x0
    for w in ws:
        o = F.linear(attn, w)
        x, h = add_rms_norm(x, o, norm_w, 1e-5)
    return x, h
def trit(bn, bk, split, warps, stages):
    def f():
        x = x0
        for w in ws:
            _gemv_splitk[(triton.cdiv(HID, bn), split)](attn, w, acc, B, HID, HID, attn.stride(0), BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, num_warps=warps, num_stages=stages)
            xo, h = torch.empty_like(x), torch.empty_like(x)
            _add_rms_norm_f32[(B,)](x, acc, norm_w, xo, h, HID, 1e-5, BLOCK=4096)
            x = xo
        return x, h
    return f
def timed(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    return median_ms(g.replay, 30) * 1e3 / L
ref = base()
res = {"cublas_us_per_layer": timed(base)}
print("cublas", res["cublas_us_per_layer"], flush=True)
rows = []
for bn, bk, split, warps, stages in itertools.product((16, 32, 64), (128, 256), (1, 2, 4, 8), (4, 8), (3, 4)):
    try:
        f = trit(bn, bk, split, warps, stages)
        out = f(); torch.cuda.synchronize()
        err = (out[0].float() - ref[0].float()).abs().max().item()
        t = timed(f)
    except Exception as e:
        continue
    rows.append((t, bn, bk, split, warps, stages, err))
rows.sort()
res["triton_best"] = rows[:8]
print(json.dumps(res), flush=True)
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/oproj.json", "w"), indent=1)
