# Tried and not kept: the decode attention as ONE launch, the last of a head's tiles to finish
# (an atomic counter per sequence and KV head, reset by that program) merging the head's tiles;
# DIRECT: a head with a single tile writes its output without the round trip. Timed against the
# two-launch kernel (split + merge) and the split launch alone, three alternating rounds. GPU:
#   python benchmarks/gpu/last_arriver_merge.py   (writes fused-merge.json to $OUT or /tmp)
import json, os, math
import torch, triton
import triton.language as tl
from baklava.bench import kernel_speed as ks
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table, _split_kernel


@triton.jit
def _split_merge_kernel(
    Q, K, V, KN, VN, FILL, OFFSETS, TILE_HEAD, TILE_START, TILE_FIRST, COUNTER, MID_O, MID_M, MID_L, OUT,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_ob, stride_oh, stride_fb,
    scale, SPLIT_LEN, H_KV,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    TILE_BLOCK: tl.constexpr, PDL: tl.constexpr, DIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    if PDL:
        tl.extra.cuda.gdc_wait()
    h = tl.load(TILE_HEAD + t)
    start = tl.load(TILE_START + t)
    fill = tl.load(FILL + b * stride_fb + h).to(tl.int32)
    base = tl.load(OFFSETS + h).to(tl.int64)
    first_h = tl.load(TILE_FIRST + h)
    count = tl.load(TILE_FIRST + h + 1) - first_h
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    end = tl.minimum(start + SPLIT_LEN, fill)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        live = n < end
        rows = (base + n).to(tl.int64)
        k = tl.load(K + b * stride_kb + rows[:, None] * stride_kt + d[None, :], mask=live[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale
        qk = tl.where(live[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + rows[:, None] * stride_vt + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    in_group = g < GROUP
    qrow = h * GROUP + g
    single = count == 1
    if not DIRECT:
        single = count < 0
    if single:  # the head's only tile: merge the new token here, no round trip
        qf = q.to(tl.float32)
        kn = tl.load(KN + b * stride_knb + h * stride_knh + d).to(tl.float32)
        vn = tl.load(VN + b * stride_vnb + h * stride_vnh + d).to(tl.float32)
        s_new = tl.sum(qf * kn[None, :], 1) * scale
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(s_new - m_new)
        den = l_i * alpha + w
        num = acc * alpha[:, None] + w[:, None] * vn[None, :]
        tl.store(OUT + b * stride_ob + qrow[:, None] * stride_oh + d[None, :], num / den[:, None], mask=in_group[:, None])
    else:
        slot = b * n_tiles + t
        tl.store(MID_M + slot * G_PAD + g, m_i, mask=in_group)
        tl.store(MID_L + slot * G_PAD + g, l_i, mask=in_group)
        tl.store(MID_O + (slot * G_PAD + g)[:, None] * D + d[None, :], acc, mask=in_group[:, None])
        tl.debug_barrier()
        old = tl.atomic_add(COUNTER + b * H_KV + h, 1, sem="acq_rel")
        if old == count - 1:  # the last of the head's tiles to finish merges them
            tl.store(COUNTER + b * H_KV + h, 0)
            first = b * n_tiles + first_h
            for gi in tl.static_range(GROUP):
                qh = h * GROUP + gi
                qv = tl.load(Q + b * stride_qb + qh * stride_qh + d).to(tl.float32)
                k_new = tl.load(KN + b * stride_knb + h * stride_knh + d).to(tl.float32)
                v_new = tl.load(VN + b * stride_vnb + h * stride_vnh + d).to(tl.float32)
                s_new = tl.sum(qv * k_new, 0) * scale
                m = s_new
                num = v_new
                den = tl.full([], 1.0, tl.float32)
                for s0 in range(0, count, TILE_BLOCK):
                    tt = s0 + tl.arange(0, TILE_BLOCK)
                    ok = tt < count
                    row = (first + tt) * G_PAD + gi
                    m_t = tl.load(MID_M + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    l_t = tl.load(MID_L + row, mask=ok, other=0.0, cache_modifier=".cg")
                    o_t = tl.load(MID_O + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
                    mn = tl.maximum(m, tl.max(m_t, 0))
                    al = tl.exp(m - mn)
                    w = tl.exp(m_t - mn)
                    den = den * al + tl.sum(l_t * w, 0)
                    num = num * al + tl.sum(o_t * w[:, None], 0)
                    m = mn
                tl.store(OUT + b * stride_ob + qh * stride_oh + d, num / den)


_counters = {}


def _mids(batch, n_tiles, g_pad, head_dim, device):
    """The split launch's partial results: output, running max, running sum (fp32)."""
    f32 = dict(dtype=torch.float32, device=device)
    shape = (batch, n_tiles, g_pad)
    return torch.empty(*shape, head_dim, **f32), torch.empty(*shape, **f32), torch.empty(*shape, **f32)


def fused(query, key_new, value_new, keys, values, fill, offsets, caps, scale, table, direct, num_warps=4, num_stages=None):
    batch, q_heads, head_dim = query.shape
    kv_heads = key_new.shape[1]
    num_stages = num_stages or (3 if batch <= 2 else 2)
    group = q_heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    tile, (tile_head, tile_start, tile_first) = table
    n_tiles = tile_head.numel()
    mid_o, mid_m, mid_l = _mids(batch, n_tiles, g_pad, head_dim, query.device)
    key = (batch, kv_heads)
    if key not in _counters:
        _counters[key] = torch.zeros(batch, kv_heads, dtype=torch.int32, device=query.device)
    counter = _counters[key]
    out = torch.empty_like(query)
    _split_merge_kernel[(batch, n_tiles)](
        query, keys, values, key_new, value_new, fill, offsets, tile_head, tile_start, tile_first, counter, mid_o, mid_m, mid_l, out,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        key_new.stride(0), key_new.stride(1), value_new.stride(0), value_new.stride(1), out.stride(0), out.stride(1), fill.stride(0),
        scale, tile, kv_heads,
        GROUP=group, G_PAD=g_pad, D=head_dim, BLOCK_N=64, TILE_BLOCK=32, PDL=query.is_cuda, DIRECT=direct,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=query.is_cuda)
    return out


def split_only(query, key_new, value_new, keys, values, fill, offsets, caps, scale, table):
    batch, q_heads, head_dim = query.shape
    group = q_heads // key_new.shape[1]
    g_pad = 16
    tile, (tile_head, tile_start, tile_first) = table
    n_tiles = tile_head.numel()
    mid_o, mid_m, mid_l = _mids(batch, n_tiles, g_pad, head_dim, query.device)
    _split_kernel[(batch, n_tiles)](
        query, keys, values, fill, offsets, tile_head, tile_start, mid_o, mid_m, mid_l, mid_m,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), fill.stride(0), 0, 0,
        scale, tile, GROUP=group, G_PAD=g_pad, D=head_dim, BLOCK_N=64, STORE_LOGITS=False, PDL=True,
        num_warps=4, num_stages=3 if batch <= 2 else 2, launch_pdl=True)



def main():
    dev, dt = "cuda", torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = []
    cases = [(64, 4096), (32, 8192), (16, 16384), (8, 32768), (1, 131072)]
    for batch, context in cases:
        torch.manual_seed(0)
        case = ks.packed_case(batch, context, 0.3, dev, dt); caps, q = case.caps, case.query
        ragged = case._replace(fill=(case.fill.float() * torch.rand(batch, ks.HKV, device=dev)).int())  # partial fills
        nbytes = 2 * case.keys.numel() * 2
        kd, vd = case.dense_same()
        sbytes = 2 * kd.numel() * 2
        row = {"batch": batch, "context": context}
        tables = {}
        for per_sm in (4, 8, 12):
            tile = tile_length(caps, batch, 64, sms, per_sm)
            tables[per_sm] = (tile, tile_table(caps, tile, dev))
        default = tile_length(caps, batch, 64, sms)
        dtab = (default, tile_table(caps, default, dev))
        row["tile"] = default
        row["tiles_per_seq"] = dtab[1][0].numel()
        row["single_tile_heads"] = sum(1 for c in caps if math.ceil(c / default) <= 1)
        # correctness
        for c in (case, ragged):
            ref = packed_decode_attention(*c.args(), table=dtab)
            for direct in (False, True):
                for _ in range(3):
                    o = fused(*c.args(), dtab, direct)
                    row.setdefault("maxdiff", []).append(float((o.float() - ref.float()).abs().max()))
        fns = {
            "current": lambda: packed_decode_attention(*case.args(), table=dtab),
            "split_only": lambda: split_only(*case.args(), dtab),
        }
        for per_sm, tab in tables.items():
            fns[f"fused{per_sm}"] = (lambda tab=tab: fused(*case.args(), tab, False))
            fns[f"fused_direct{per_sm}"] = (lambda tab=tab: fused(*case.args(), tab, True))
        times = {k: [] for k in fns}
        t_same = []
        for rep in range(3):
            t_same.append(ks._best_sdpa(q[:, :, None], kd, vd)[0])
            for k, fn in fns.items():
                times[k].append(ks._time(fn))
        ts = min(t_same)
        row["sdpa_same_ms"] = [round(x * 1e3, 4) for x in t_same]
        for k, v in times.items():
            row[k + "_ms"] = [round(x * 1e3, 4) for x in v]
            row[k + "_ratio"] = [round((nbytes / x) / (sbytes / ts), 3) for x in v]
        print(json.dumps(row), flush=True)
        res.append(row)
        case = ragged = kd = vd = None  # free this case's tensors before the next one
    json.dump(res, open(os.environ.get("OUT", "/tmp") + "/fused-merge.json", "w"), indent=1)


if __name__ == '__main__':
    main()
