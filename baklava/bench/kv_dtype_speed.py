"""Decode attention over quantized slots on the GPU: each KV dtype against bf16, one run.

One layer of Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128), ``batch`` sequences
whose heads hold BaKlaVa-like uneven capacities averaging ``budget x context`` (every head full),
the same random cache stored as bf16, fp8, int8 and int4 (:mod:`baklava.kv_format`). Each call is
captured in a CUDA graph and replayed (as the decode step runs); the formats are timed in turn,
``rounds`` times over (a drift of the shared machine hits them alike), and every ratio is the
median of the rounds' ratios. Bytes = payload + scales of K and V (what the kernel reads).
With several ``--launches`` (slots a tile step x warps x pipeline stages of the Triton split
kernel, or ``mmaN[sK][xS][mM][c]``: the Gluon mma split kernel of int8 / fp8 slots at N one-warp
programs an SM, K 16-slot steps a chunk of its ring and S chunks in it, M the fewest chunks a
program of its balanced table reads, ``c`` with one contiguous tile a program instead of a head's
chunks taken in turn) every format is timed at each launch it
runs, against bf16 at the first: a sweep in one run. Each launch reads the table the runtime
builds for it (:func:`~baklava.kernels.decode_attention.split_table`'s rules). ``calls`` > 1
captures that many calls in one graph (a step's layers, as the runtime replays them) and times
one: the graph's own launch is then shared, as it is across a model's layers.

    baklava-bench kv-dtype --batch 8 --context 32768 --budget 0.3   # 64x4x2 and mma8: what is deployed
    baklava-bench kv-dtype --launches 64x4x2,128x4x2,128x8x2,256x8x2 --rounds 3
    baklava-bench kv-dtype --launches 64x4x2,mma7s1x3,mma8s1,mma8,mma8s2x3,mma6s4 --rounds 9
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import torch

from baklava import kv_format
from baklava.bench.kernel_speed import _time, packed_case
from baklava.errors import BaklavaError
from baklava.kernels.decode_attention import (
    MMA_BLOCK_N,
    MMA_MIN_CHUNKS,
    MMA_STAGES,
    MMA_SUB,
    SplitTable,
    packed_decode_attention,
    split_table,
)

FORMATS = ("bf16", "fp8", "int8", "int4")


@dataclass(frozen=True)
class Launch:
    """One launch of the split kernel: slots a tile step reads, warps, pipeline stages (the Triton
    kernel), or the mma kernel (int8 / fp8 only) at ``per_sm`` one-warp programs an SM, ``sub``
    16-slot steps a chunk of its ring and ``stages`` chunks in it."""

    block_n: int = 64
    warps: int = 4
    stages: int = 2
    per_sm: int | None = None  # the mma kernel's; None: the Triton kernel
    interleave: bool = True  # the mma kernel's: a head's programs take its chunks in turn
    sub: int = MMA_SUB
    min_chunks: int = MMA_MIN_CHUNKS  # the mma kernel's balanced table: the fewest chunks a program

    def __str__(self) -> str:
        if self.mma:
            sub = f"s{self.sub}" if self.sub != MMA_SUB else ""
            stages = f"x{self.stages}" if self.stages != MMA_STAGES else ""
            fewest = f"m{self.min_chunks}" if self.min_chunks != MMA_MIN_CHUNKS else ""
            return f"mma{self.per_sm}{sub}{stages}{fewest}" + ("" if self.interleave else "c")
        return f"{self.block_n}x{self.warps}x{self.stages}"

    @property
    def mma(self) -> bool:
        return self.per_sm is not None

    def runs(self, kv_dtype: str) -> bool:
        return not self.mma or kv_dtype in ("int8", "fp8")

    def table(self, capacities, batch: int, sms: int, device) -> SplitTable:
        """The table the runtime would build for this launch (:func:`split_table`)."""
        return split_table(
            capacities, batch, device, self.mma, self.block_n, sms, self.per_sm, self.sub, self.min_chunks
        )


_MMA_LAUNCH = re.compile(r"mma(\d+)(?:s(\d+))?(?:x(\d+))?(?:m(\d+))?(c?)")


def parse_launches(text: str) -> list[Launch]:
    """``"64x4x2,128x8x2,mma8s1x3"`` -> launches; a one-line error for anything else."""
    launches = []
    for part in text.split(","):
        word = part.strip().lower()
        if word.startswith("mma"):
            found = _MMA_LAUNCH.fullmatch(word)
            if not found or int(found[1]) < 1:
                raise BaklavaError(
                    f"launch {part!r} is not mmaN[sK][xS][mM][c] (N programs an SM, K steps a chunk, "
                    "S chunks, M the fewest chunks a program), e.g. mma8"
                )
            sub, stages = int(found[2] or MMA_SUB), int(found[3] or MMA_STAGES)
            fewest = int(found[4] or MMA_MIN_CHUNKS)
            if sub < 1 or stages < 2 or fewest < 1:
                raise BaklavaError(
                    f"launch {part!r}: the mma kernel's ring takes chunks of >= 1 step, >= 2 of them, "
                    ">= 1 chunk a program"
                )
            launches.append(Launch(MMA_BLOCK_N, 1, stages, int(found[1]), not found[5], sub, fewest))
            continue
        fields = word.split("x")
        if len(fields) != 3 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise BaklavaError(f"launch {part!r} is not BLOCKxWARPSxSTAGES, e.g. 64x4x2")
        block_n, warps, stages = (int(f) for f in fields)
        if block_n & (block_n - 1) or block_n < 16 or warps & (warps - 1):
            raise BaklavaError(f"launch {part!r}: block and warps must be powers of two, block >= 16")
        launches.append(Launch(block_n, warps, stages))
    if len(set(launches)) != len(launches):
        raise BaklavaError(f"launches must be distinct, got {text!r}")
    return launches


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


def measure(
    batch: int,
    context: int,
    budget: float,
    rounds: int = 5,
    formats=FORMATS,
    launches=(Launch(),),
    calls: int = 1,
) -> list[dict]:
    """One row per format and launch: milliseconds a call, bytes, TB/s, speedup over bf16 at the
    first launch, and the largest difference of its output from bf16's (the quantization error it
    adds). ``calls``: calls a CUDA graph replays (the time is one call's)."""
    case = packed_case(batch, context, budget, "cuda", torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tables = {launch: launch.table(case.caps, batch, sms, "cuda") for launch in launches}
    q, kn, vn, _, _, fill, offsets, caps, scale = case.args()
    stores = {name: stored(case.keys, case.values, name) for name in formats}
    variants = [(name, launch) for name in formats for launch in launches if launch.runs(name)]
    base = ("bf16", launches[0])
    if base not in variants:
        raise BaklavaError(f"the first launch must run bf16 (the baseline), got {launches[0]}")

    def call(name, launch):
        s = {k: v for k, v in stores[name].items() if k != "nbytes"}
        kv = s.pop("keys"), s.pop("values")
        how = dict(block_n=launch.block_n, num_warps=launch.warps, num_stages=launch.stages)
        if launch.mma:
            how |= dict(
                kernel="mma", mma_stages=launch.stages, mma_sub=launch.sub, mma_interleave=launch.interleave
            )
        else:
            how |= dict(kernel="triton")
        table = tables[launch]
        return lambda: packed_decode_attention(
            q, kn, vn, *kv, fill, offsets, caps, scale, table=table, **how, **s
        )

    outputs = {v: call(*v)() for v in variants}
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            times[v].append(_time(call(*v), calls=calls))
    rows = []
    for v in variants:
        name, launch = v
        ms = statistics.median(times[v]) * 1e3
        speedup = statistics.median(b / t for b, t in zip(times[base], times[v], strict=True))
        nbytes = stores[name]["nbytes"]
        rows.append(
            {
                "kv_dtype": name,
                "launch": str(launch),
                "batch": batch,
                "context": context,
                "budget": budget,
                "calls_per_graph": calls,
                "ms": round(ms, 4),
                "kv_mib": round(nbytes / 2**20, 1),
                "TBps": round(nbytes / (ms / 1e3) / 1e12, 3),
                "speedup_vs_bf16": round(speedup, 3),
                "bytes_vs_bf16": round(stores["bf16"]["nbytes"] / nbytes, 3),
                "max_abs_diff_vs_bf16": round(
                    float((outputs[v].float() - outputs[base].float()).abs().max()), 5
                ),
                "rounds_ms": [round(t * 1e3, 4) for t in times[v]],
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    sweep = len({r.get("launch") for r in rows}) > 1
    first = rows[0].get("launch")
    lines = [
        f"Decode attention, Llama-3-8B shapes, batch {rows[0]['batch']}, context {rows[0]['context']}, "
        f"budget {rows[0]['budget']}, {meta.get('gpu', '')}, {meta.get('date', '')}"
        + (
            f", {rows[0]['calls_per_graph']} calls a CUDA graph"
            if rows[0].get("calls_per_graph", 1) > 1
            else ""
        ),
        "",
        "| KV dtype | launch | KV MiB (one layer) | ms | TB/s on its bytes | speedup vs bf16"
        + (f" {first}" if sweep else "")
        + " | bytes vs bf16 | max |diff| vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kv_dtype']} | {r.get('launch', '')} | {r['kv_mib']} | {r['ms']} | {r['TBps']} | "
            f"{r['speedup_vs_bf16']}x | {r['bytes_vs_bf16']}x | {r['max_abs_diff_vs_bf16']} |"
        )
    if sweep:  # each format's fastest launch
        lines += ["", "Fastest launch (block x warps x stages) per KV dtype:", ""]
        for name in dict.fromkeys(r["kv_dtype"] for r in rows):
            best = min((r for r in rows if r["kv_dtype"] == name), key=lambda r: r["ms"])
            lines.append(
                f"- {name}: {best['launch']}, {best['ms']} ms, {best['speedup_vs_bf16']}x bf16 {first}"
            )
    return "\n".join(lines) + "\n"
