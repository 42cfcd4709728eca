# Each decode projection of Llama-3-8B at batch 8 timed alone in a CUDA graph (4 weights rotated, no L2
# reuse): cuBLAS with the separate RMSNorm / SiLU / residual launches against kernels/decode_gemv.py's
# kernels (and variants of a normalising prologue). GPU machine: python benchmarks/gpu/gemv_parts.py
import itertools, json, os, sys, time, torch, triton, triton.language as tl
import torch.nn.functional as F
import numpy as np

def median_ms(fn, iters):
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return float(np.median(ts))

def copy_bandwidth(nbytes=4 << 30):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda"); dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), 10) / 1e3)

def uneven_capacities(layers, kv_heads, context, budget, seed=0):
    gen = np.random.default_rng(seed); n = layers * kv_heads
    total = round(budget * context * n)
    w = np.exp(0.6 * gen.standard_normal(n))
    caps = np.clip(np.round(w / w.sum() * total), 1, context).astype(np.int64)
    return caps.reshape(layers, kv_heads)

@triton.jit
def _silu_mul_kernel(GU, Y, inner, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inner
    g = tl.load(GU + b * 2 * inner + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + b * 2 * inner + inner + offs, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)
    tl.store(Y + b * inner + offs, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=ok)

def silu_mul(gu):
    y = gu.new_empty(gu.shape[0], gu.shape[1] // 2)
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(gu.shape[1] // 2, 1024))](gu, y, gu.shape[1] // 2, BLOCK=1024)
    return y

@triton.jit
def _gemv(X, W, BIAS, Y, R, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EPI: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    # EPI 0: Y = X W^T (+bias); 1: Y = R + X W^T (residual, fp32 add, one rounding); 2: W = [gate; up]
    # (2N rows), Y = SiLU(X Wg^T) * (X Wu^T), each step rounded as eager rounds
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    wp = W + rn[:, None].to(tl.int64) * K + rk[None, :]
    xp = X + rm[:, None] * K + rk[None, :]
    xm = rm[:, None] < M
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(xp + k, mask=xm, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(wp + k)), acc)
        if EPI == 2:
            acc2 = tl.dot(x, tl.trans(tl.load(wp + N * K + k)), acc2)
    om = xm & (rn[None, :] < N)
    yp = Y + rm[:, None] * N + rn[None, :]
    if EPI == 0:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn)[None, :].to(tl.float32)
        tl.store(yp, acc.to(Y.dtype.element_ty), mask=om)
    elif EPI == 1:
        r = tl.load(R + rm[:, None] * N + rn[None, :], mask=om, other=0.0)
        tl.store(yp, (acc + r.to(tl.float32)).to(Y.dtype.element_ty), mask=om)
    else:
        g = acc.to(Y.dtype.element_ty).to(tl.float32)
        u = acc2.to(Y.dtype.element_ty).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(yp, (act * u).to(Y.dtype.element_ty), mask=om)

def gemv(x, w, cfg, epi=0, res=None, bias=None, pdl=False, out=None):
    M, K = x.shape
    N = w.shape[0] // (2 if epi == 2 else 1)
    bn, bk, warps, stages = cfg
    y = out if out is not None else x.new_empty(M, N)
    _gemv[(triton.cdiv(N, bn),)](x, w, bias if bias is not None else w, y, res if res is not None else y, M, N, K,
        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EPI=epi, HAS_BIAS=bias is not None, PDL=pdl,
        num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y

@triton.jit
def _add_norm(X, ADD, W, XO, Y, n, eps, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK); ok = offs < n
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + row * n + offs, mask=ok, other=0.0)
    if HAS_ADD:
        o = tl.load(ADD + row * n + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + o.to(tl.float32)).to(x.dtype)
        tl.store(XO + row * n + offs, x, mask=ok)
    v = x.to(tl.float32)
    var = tl.sum(v * v, 0) / n
    normed = (v * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
    w = tl.load(W + offs, mask=ok, other=0.0)
    tl.store(Y + row * n + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)

def norm_pdl(x, w, add=None, pdl=True):
    y = torch.empty_like(x); xo = torch.empty_like(x) if add is not None else x
    _add_norm[(x.shape[0],)](x, add if add is not None else x, w, xo, y, x.shape[1], 1e-5, HAS_ADD=add is not None,
                             BLOCK=4096, PDL=pdl, launch_pdl=pdl)
    return xo, y

@triton.jit
def _rope(QKV, COS, SIN, Q, K, V, q_heads, kv_heads, width, D: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0); head = tl.program_id(1)
    offs = tl.arange(0, D)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    src = QKV + b * width + head * D
    x = tl.load(src + offs)
    if head < q_heads + kv_heads:
        half: tl.constexpr = D // 2
        partner = tl.load(src + (offs + half) % D)
        rotated = tl.where(offs < half, -partner, partner)
        cos = tl.load(COS + offs); sin = tl.load(SIN + offs)
        a = (x.to(tl.float32) * cos.to(tl.float32)).to(x.dtype)
        c = (rotated.to(tl.float32) * sin.to(tl.float32)).to(x.dtype)
        out = (a.to(tl.float32) + c.to(tl.float32)).to(x.dtype)
        if head < q_heads:
            tl.store(Q + (b * q_heads + head) * D + offs, out)
        else:
            tl.store(K + (b * kv_heads + head - q_heads) * D + offs, out)
    else:
        tl.store(V + (b * kv_heads + head - q_heads - kv_heads) * D + offs, x)

def rope_pdl(qkv, cos, sin, pdl=True):
    q = qkv.new_empty(B, HQ, D); k = qkv.new_empty(B, HKV, D); v = torch.empty_like(k)
    _rope[(B, HQ + 2 * HKV)](qkv, cos, sin, q, k, v, HQ, HKV, qkv.shape[1], D=D, PDL=pdl, launch_pdl=pdl)
    return q, k, v


@triton.jit
def _var(X, W, NW, SS, Y, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    # MODE 0: plain; 1: x*nw in loop, r on acc; 2: x*r*nw in loop (fp32 math, one cast)
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M); rn = pid * BLOCK_N + tl.arange(0, BLOCK_N); rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    inv = tl.rsqrt(tl.load(SS + rm, mask=m_ok, other=1.0) / K + 1e-5)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * K + kk[None, :], mask=m_ok[:, None], other=0.0)
        if MODE == 1:
            x = (x.to(tl.float32) * tl.load(NW + kk)[None, :].to(tl.float32)).to(x.dtype)
        if MODE == 2:
            x = (x.to(tl.float32) * inv[:, None] * tl.load(NW + kk)[None, :].to(tl.float32)).to(x.dtype)
        w = tl.load(W + rn[:, None].to(tl.int64) * K + kk[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    if MODE == 1:
        acc = acc * inv[:, None]
    tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None])

def var(x, w, nw, ss, y, mode, bn=32, bk=128, stages=5):
    _var[(w.shape[0] // bn,)](x, w, nw, ss, y, x.shape[0], w.shape[0], x.shape[1], BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, MODE=mode, num_warps=4, num_stages=stages)

from baklava.kernels import decode_gemv as dg
B=8; D=128; HQ=32; HKV=8
dev, dt = "cuda", torch.bfloat16
res = {}
def graph_us(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    return median_ms(g.replay, 15) / reps * 1e3
shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
for name, (N, K) in shapes.items():
    ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.01 for _ in range(4)]
    i = [0]
    def nxt():
        i[0] = (i[0] + 1) % 4; return ws[i[0]]
    x = torch.randn(B, K, device=dev, dtype=dt); nw = torch.rand(K, device=dev, dtype=dt) + 0.5
    r = torch.randn(B, N, device=dev, dtype=dt)
    ss = dg.sum_squares(x); ss128 = torch.cat([ss / 128] * 128)
    row = {}
    if name in ("qkv", "gate_up"):
        row["cublas+norm"] = graph_us(lambda: F.linear(norm_pdl(x, nw, pdl=False)[1], nxt()))
        if name == "gate_up":
            row["cublas+norm+silu"] = graph_us(lambda: silu_mul(F.linear(norm_pdl(x, nw, pdl=False)[1], nxt())))
            row["fused_norm_silu"] = graph_us(lambda: dg.norm_linear_silu(x, ss128, nw, 1e-5, nxt()))
            y = x.new_empty(B, N // 2)
            row["fused_silu_nonorm"] = graph_us(lambda: dg._launch(x, nxt(), y, epi=2))
        else:
            row["fused_norm"] = graph_us(lambda: dg.norm_linear(x, ss128, nw, 1e-5, nxt()))
            y = x.new_empty(B, N)
            row["fused_nonorm"] = graph_us(lambda: dg._launch(x, nxt(), y, epi=0))
            for mode in (0, 1, 2):
                for bk, st in ((128, 5), (64, 6), (256, 3)):
                    row[f"var{mode}_bk{bk}"] = graph_us(lambda: var(x, nxt(), nw, ss[0], y, mode, 32, bk, st))
            row["norm_then_fused_nonorm"] = graph_us(lambda: dg._launch(norm_pdl(x, nw, pdl=False)[1], nxt(), y, epi=0))
    else:
        row["cublas+add"] = graph_us(lambda: r + F.linear(x, nxt()))
        row["fused_residual"] = graph_us(lambda: dg.linear_residual(x, nxt(), r))
    row["cublas"] = graph_us(lambda: F.linear(x, nxt()))
    res[name] = row
    print(name, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    del ws
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/gemv-parts.json", "w"), indent=1)
