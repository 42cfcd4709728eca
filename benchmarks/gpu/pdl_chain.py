# Decode-step main-stream chain over 32 Llama-3-8B layers (batch 8, 16k, budget 0.3, real packed
# attention): cuBLAS + Triton elementwise (now) vs Triton GEMVs with fused epilogues, without and
# with programmatic dependent launch (PDL), the dependents triggered at a kernel's start (0), after its
# main loop (1) or at its exit (2). GPU machine: python benchmarks/gpu/pdl_chain.py (writes
# pdl-chain.json to $OUT or /tmp).
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
from baklava.trt_plugins import triton_decode_attention as tda

@triton.jit
def _gemv(X, W, BIAS, Y, R, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EPI: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr, TRIG: tl.constexpr):
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
        if TRIG == 0:
            tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(xp + k, mask=xm, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(wp + k)), acc)
        if EPI == 2:
            acc2 = tl.dot(x, tl.trans(tl.load(wp + N * K + k)), acc2)
    if PDL:
        if TRIG == 1:
            tl.extra.cuda.gdc_launch_dependents()
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

TRIGGER = [0]
def gemv(x, w, cfg, epi=0, res=None, bias=None, pdl=False, out=None):
    M, K = x.shape
    N = w.shape[0] // (2 if epi == 2 else 1)
    bn, bk, warps, stages = cfg
    y = out if out is not None else x.new_empty(M, N)
    _gemv[(triton.cdiv(N, bn),)](x, w, bias if bias is not None else w, y, res if res is not None else y, M, N, K,
        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EPI=epi, HAS_BIAS=bias is not None, PDL=pdl, TRIG=TRIGGER[0],
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

B, CTX, L, HKV, HQ, D, HID, INNER = 8, 16384, 32, 8, 32, 128, 4096, 14336
dev, dt = "cuda", torch.bfloat16
sms = torch.cuda.get_device_properties(0).multi_processor_count
OUT = os.environ.get("OUT", "/tmp")
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}

def graph_ms(fn, reps=1, iters=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    return median_ms(g.replay, iters) / reps

best = {"qkv": (32, 128, 4, 5), "o": (32, 256, 4, 5), "gate_up": (64, 256, 4, 3), "down": (32, 256, 4, 5)}
# ---- 2. the chain over 32 layers
caps_all = uneven_capacities(L, HKV, CTX, 0.3)
layers = []
for caps in caps_all.tolist():
    total = sum(caps)
    keys, values = (torch.randn(B, total, D, device=dev, dtype=dt) for _ in range(2))
    fill = torch.tensor([caps] * B, dtype=torch.int64, device=dev)
    offsets = torch.tensor([sum(caps[:i]) for i in range(HKV)], dtype=torch.int32, device=dev)
    tile = tda.tile_length(caps, B, 64, sms)
    layers.append(dict(caps=caps, k=keys, v=values, fill=fill, off=offsets, table=(tile, tda.tile_table(caps, tile, dev)),
        wqkv=torch.randn(6144, HID, device=dev, dtype=dt) * 0.01, wo=torch.randn(HID, HID, device=dev, dtype=dt) * 0.01,
        wgu=torch.randn(2 * INNER, HID, device=dev, dtype=dt) * 0.01, wd=torch.randn(HID, INNER, device=dev, dtype=dt) * 0.01,
        n1=torch.rand(HID, device=dev, dtype=dt) + 0.5, n2=torch.rand(HID, device=dev, dtype=dt) + 0.5))
cos = torch.rand(1, 1, D, device=dev, dtype=dt); sin = torch.rand(1, 1, D, device=dev, dtype=dt)
x0 = torch.randn(B, HID, device=dev, dtype=dt)
kv_bytes = sum(l["k"].numel() * 4 for l in layers); w_bytes = sum(sum(l[n].numel() * 2 for n in ("wqkv", "wo", "wgu", "wd")) for l in layers)

def attn(l, q, k, v):
    return tda.packed_decode_attention(q, k, v, l["k"], l["v"], l["fill"], l["off"], l["caps"], D ** -0.5, table=l["table"])

def chain_now():
    x = x0.clone()
    for l in layers:
        _, h = norm_pdl(x, l["n1"], pdl=False)
        q, k, v = rope_pdl(F.linear(h, l["wqkv"]), cos, sin, pdl=False)
        o = attn(l, q, k, v)
        x, h = norm_pdl(x, l["n2"], add=F.linear(o.reshape(B, -1), l["wo"]), pdl=False)
        x.addmm_(silu_mul(F.linear(h, l["wgu"])), l["wd"].t())
    return x

def chain_triton(pdl):
    def run():
        x = x0.clone()
        for l in layers:
            _, h = norm_pdl(x, l["n1"], pdl=pdl)
            q, k, v = rope_pdl(gemv(h, l["wqkv"], best["qkv"], pdl=pdl), cos, sin, pdl=pdl)
            o = attn(l, q, k, v)
            x, h = norm_pdl(x, l["n2"], add=gemv(o.reshape(B, -1), l["wo"], best["o"], pdl=pdl), pdl=pdl)
            act = gemv(h, l["wgu"], best["gate_up"], epi=2, pdl=pdl)
            x = gemv(act, l["wd"], best["down"], epi=1, res=x, pdl=pdl, out=x)
        return x
    return run

def gemvs_only(kind):
    a = torch.randn(B, HID, device=dev, dtype=dt); act = torch.randn(B, INNER, device=dev, dtype=dt)
    def run():
        x = x0.clone()
        for l in layers:
            if kind == "cublas":
                F.linear(a, l["wqkv"]); F.linear(a, l["wo"]); F.linear(a, l["wgu"]); x.addmm_(act, l["wd"].t())
            else:
                p = kind == "triton_pdl"
                gemv(a, l["wqkv"], best["qkv"], pdl=p); gemv(a, l["wo"], best["o"], pdl=p)
                gemv(a, l["wgu"], best["gate_up"], epi=2, pdl=p); gemv(act, l["wd"], best["down"], epi=1, res=x, out=x, pdl=p)
        return x
    return run

ref = chain_now(); got = chain_triton(False)(); gotp = chain_triton(True)()
res["chain_check"] = {"max_abs_vs_now": (got.float() - ref.float()).abs().max().item(),
                      "pdl_vs_nopdl_equal": bool(torch.equal(got, gotp)), "ref_absmax": ref.float().abs().max().item()}
print(res["chain_check"], flush=True)
bw = copy_bandwidth()
res["copy_TBps"] = bw / 1e12
res["floor_ms_weights_kv"] = (w_bytes + kv_bytes) / bw * 1e3
for rep in range(2):
    for trig in (0, 1, 2):
        TRIGGER[0] = trig
        for name, fn in [("triton_pdl", chain_triton(True)), ("gemv_triton_pdl", gemvs_only("triton_pdl"))]:
            res.setdefault("chain_ms", {}).setdefault(f"{name}_trig{trig}", []).append(graph_ms(fn, 1, 30))
    for name, fn in [("now", chain_now), ("triton", chain_triton(False)), ("gemv_cublas", gemvs_only("cublas")), ("gemv_triton", gemvs_only("triton"))]:
        res.setdefault("chain_ms", {}).setdefault(name, []).append(graph_ms(fn, 1, 30))
    print(json.dumps(res["chain_ms"]), flush=True)
json.dump(res, open(f"{OUT}/pdl-chain.json", "w"), indent=1)
