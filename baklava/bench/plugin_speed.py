"""Decode-step speed of the TensorRT plugins' kernels, launched as an engine would launch them.

One Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128, bf16), every head full, a decode
step (S = 1): the plugins' one-launch kernels (the PTX they embed, through the CUDA driver with
the plugins' launch parameters, each captured in a CUDA graph; and the same kernels through
Triton's own launcher, which specialises the call, e.g. ``S = 1``) against the PyTorch runtime's two-launch decode attention over the same cache, in
one run. The cache update runs in place, every step evicting (its victim is wherever the lowest
score is, so about half the head shifts)::

    python -m baklava.bench.plugin_speed --out plugin_speed.json

Bandwidth is the cache's key and value bytes over the time.
"""

from __future__ import annotations

import json
import sys

import torch

from baklava.atomic import write_text_atomic
from baklava.bench.kernel_speed import HKV, HQ, D, _time, uneven_caps
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table
from baklava.trt_plugins import aot
from baklava.trt_plugins.cuda_launch import launch_kernel

CASES = [(8, 32768, 0.3), (1, 131072, 0.3), (64, 4096, 0.3)]


def measure(batch: int, context: int, budget: float) -> dict:
    dev, dt = "cuda", torch.bfloat16
    caps = uneven_caps(context, budget, HKV)
    total = sum(caps)
    arch = aot.device_arch()
    attn = aot.attention_plan(caps, HQ, D**-0.5, 32, head_dim=D, dtype="bf16")
    upd = aot.cache_update_plan(caps, 4, 32, "h2o", 7, head_dim=D, dtype="bf16")
    attn_k, upd_k = attn.compile(arch), upd.compile(arch)
    gen = torch.Generator(device=dev).manual_seed(0)
    args = {
        "query": torch.randn(batch, HQ, 1, D, device=dev, dtype=dt, generator=gen),
        "key": torch.randn(batch, HKV, 1, D, device=dev, dtype=dt, generator=gen),
        "value": torch.randn(batch, HKV, 1, D, device=dev, dtype=dt, generator=gen),
        "past_key": torch.randn(batch, total, D, device=dev, dtype=dt, generator=gen),
        "past_value": torch.randn(batch, total, D, device=dev, dtype=dt, generator=gen),
        "past_fill": torch.tensor([caps] * batch, dtype=torch.int64, device=dev),
        "past_position": torch.cat([torch.arange(c, device=dev) for c in caps]).repeat(batch, 1),
        "past_score": torch.rand(batch, total, device=dev, generator=gen),
        "seen": torch.full((batch,), context, dtype=torch.int64, device=dev),
        "token_mask": torch.ones(batch, 1, dtype=torch.bool, device=dev),
        "S": 1,
        "output": torch.empty(batch, HQ, 1, D, device=dev, dtype=dt),
        "slot_mass": torch.zeros(batch, total, device=dev),
        "token_mass": torch.zeros(batch, HKV, 1, device=dev),
    }
    for name in ("key", "value", "position", "score", "fill"):
        args[f"present_{name}"] = args[f"past_{name}"]
    kv_bytes = 2 * args["past_key"].numel() * args["past_key"].element_size()
    t_attn = _time(lambda: launch_kernel(attn_k, attn, args, batch, 1))
    t_attn_triton = _time(lambda: aot.launch_with_triton(attn, args, batch, 1))
    t_update = _time(lambda: launch_kernel(upd_k, upd, args, batch, 1))
    t_update_triton = _time(lambda: aot.launch_with_triton(upd, args, batch, 1))

    q, kn, vn = args["query"][:, :, 0], args["key"][:, :, 0], args["value"][:, :, 0]
    fill32 = args["past_fill"].to(torch.int32)
    offsets = torch.tensor([sum(caps[:i]) for i in range(HKV)], dtype=torch.int32, device=dev)
    tile = tile_length(caps, batch, 64, torch.cuda.get_device_properties(0).multi_processor_count)
    table = (tile, tile_table(caps, tile, dev))
    keys, values = args["past_key"], args["past_value"]
    t_runtime = _time(
        lambda: packed_decode_attention(q, kn, vn, keys, values, fill32, offsets, caps, D**-0.5, table=table)
    )
    return {
        "batch": batch, "context": context, "budget": budget, "kv_bytes": kv_bytes,
        "plugin_attention_ms": round(t_attn * 1e3, 4), "plugin_attention_TBps": round(kv_bytes / t_attn / 1e12, 3),
        "runtime_attention_ms": round(t_runtime * 1e3, 4),
        "runtime_attention_TBps": round(kv_bytes / t_runtime / 1e12, 3),
        "plugin_vs_runtime_time": round(t_attn / t_runtime, 2),
        "plugin_cache_update_ms": round(t_update * 1e3, 4),
        "triton_launcher_attention_ms": round(t_attn_triton * 1e3, 4),
        "triton_launcher_cache_update_ms": round(t_update_triton * 1e3, 4),
        "plugin_attention_shared_bytes": attn_k.shared, "plugin_update_shared_bytes": upd_k.shared,
    }  # fmt: skip


def main(argv: list[str]) -> None:
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    rows = []
    for batch, context, budget in CASES:
        rows.append(measure(batch, context, budget))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if out:
        doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        write_text_atomic(out, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
