"""Decode attention over quantized slots on the GPU: each KV dtype against bf16, one run.

One layer of Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128), ``batch`` sequences
whose heads hold BaKlaVa-like uneven capacities averaging ``budget x context`` (every head full),
the same random cache stored as bf16, fp8, int8 and int4 (:mod:`baklava.kv_format`). Each call is
captured in a CUDA graph and replayed (as the decode step runs); the formats are timed in turn,
``rounds`` times over (a drift of the shared machine hits them alike), and every ratio is the
median of the rounds' ratios. Bytes = payload + scales of K and V (what the kernel reads).

    baklava-bench kv-dtype --batch 8 --context 32768 --budget 0.3
"""

from __future__ import annotations

import statistics

import torch

from baklava import kv_format
from baklava.bench.kernel_speed import _time, packed_case
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table

FORMATS = ("bf16", "fp8", "int8", "int4")


def stored(keys: torch.Tensor, values: torch.Tensor, name: str) -> dict:
    """The kernel's cache arguments for ``keys / values [B, C, D]`` stored as ``name``."""
    fmt = kv_format.parse(name)
    if not fmt.quantized:
        return {"keys": keys, "values": values, "nbytes": 2 * keys.numel() * keys.element_size()}
    (kq, ks), (vq, vs) = kv_format.quantize(keys, fmt), kv_format.quantize(values, fmt)
    nbytes = sum(t.numel() * t.element_size() for t in (kq, ks, vq, vs))
    return {
        "keys": kq,
        "values": vq,
        "key_scales": ks,
        "value_scales": vs,
        "kv_format": fmt,
        "nbytes": nbytes,
    }


def measure(batch: int, context: int, budget: float, rounds: int = 5, formats=FORMATS) -> list[dict]:
    """One row per format: milliseconds, bytes, TB/s, speedup over bf16, and the largest
    difference of its output from bf16's (the quantization error it adds)."""
    case = packed_case(batch, context, budget, "cuda", torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tile = tile_length(case.caps, batch, 64, sms)
    table = (tile, tile_table(case.caps, tile, "cuda"))
    q, kn, vn, _, _, fill, offsets, caps, scale = case.args()
    stores = {name: stored(case.keys, case.values, name) for name in formats}

    def call(name):
        s = {k: v for k, v in stores[name].items() if k != "nbytes"}
        kv = s.pop("keys"), s.pop("values")
        return lambda: packed_decode_attention(q, kn, vn, *kv, fill, offsets, caps, scale, table=table, **s)

    outputs = {name: call(name)() for name in formats}
    times = {name: [] for name in formats}
    for _ in range(rounds):
        for name in formats:
            times[name].append(_time(call(name)))
    rows = []
    for name in formats:
        ms = statistics.median(times[name]) * 1e3
        speedup = statistics.median(b / t for b, t in zip(times["bf16"], times[name], strict=True))
        nbytes = stores[name]["nbytes"]
        rows.append(
            {
                "kv_dtype": name,
                "batch": batch,
                "context": context,
                "budget": budget,
                "ms": round(ms, 4),
                "kv_mib": round(nbytes / 2**20, 1),
                "TBps": round(nbytes / (ms / 1e3) / 1e12, 3),
                "speedup_vs_bf16": round(speedup, 3),
                "bytes_vs_bf16": round(stores["bf16"]["nbytes"] / nbytes, 3),
                "max_abs_diff_vs_bf16": round(
                    float((outputs[name].float() - outputs["bf16"].float()).abs().max()), 5
                ),
                "rounds_ms": [round(t * 1e3, 4) for t in times[name]],
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Decode attention, Llama-3-8B shapes, batch {rows[0]['batch']}, context {rows[0]['context']}, "
        f"budget {rows[0]['budget']}, {meta.get('gpu', '')}, {meta.get('date', '')}",
        "",
        "| KV dtype | KV MiB (one layer) | ms | TB/s on its bytes | speedup vs bf16 | bytes vs bf16 | max |diff| vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kv_dtype']} | {r['kv_mib']} | {r['ms']} | {r['TBps']} | {r['speedup_vs_bf16']}x | "
            f"{r['bytes_vs_bf16']}x | {r['max_abs_diff_vs_bf16']} |"
        )
    return "\n".join(lines) + "\n"
