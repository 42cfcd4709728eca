"""A first chunk's causal GQA attention per prompt length: flash against cuDNN, and cuDNN's plan.

For each length n: GPU ms a call of flash attention and of cuDNN attention (its plan cached;
CUDA events over 20 calls), and the host ms of cuDNN's first call at a length it has not met on
this thread (n - 1 tokens: the plan is built then) against its second. SDPA's default choice is
printed too (3 = cuDNN). What ``prefill_attention.FLASH_MAX_FLOPS`` weighs (BENCHMARKS.md,
"cuDNN's plan per prompt length")::

    python benchmarks/serve/sdpa_plans.py --out sdpa.json                          # Qwen2.5-0.5B heads
    python benchmarks/serve/sdpa_plans.py --heads 32,8,128 --lengths 4096,32768 --out llama.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def gpu_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def host_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def one_length(n: int, q_heads: int, kv_heads: int, dim: int) -> dict:
    scale = dim**-0.5
    q, k, v = (
        torch.randn(1, h, n, dim, device="cuda", dtype=torch.bfloat16) for h in (q_heads, kv_heads, kv_heads)
    )
    flash = torch.ops.aten._scaled_dot_product_flash_attention

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    row = {
        "heads": [q_heads, kv_heads, dim],
        "tokens": n,
        "flops_per_layer": 2.0 * n * n * dim * q_heads,
        "flash_ms": round(gpu_ms(lambda: flash(q, k, v, 0.0, True, False, scale=scale)), 3),
        "default_backend": int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True)),
    }
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        new = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]  # a length this thread has not met
        row["cudnn_new_length_host_ms"] = round(host_ms(lambda: sdpa(*new)), 2)
        row["cudnn_cached_host_ms"] = round(host_ms(lambda: sdpa(*new)), 3)
        row["cudnn_ms"] = round(gpu_ms(lambda: sdpa(q, k, v)), 3)
    return row


@click.command()
@click.option("--heads", default="14,2,64", show_default=True, help="query heads, KV heads, head dim")
@click.option("--lengths", default="1024,2048,4096,8192,16384", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(heads: str, lengths: str, out: Path) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("this benchmark times GPU kernels: no CUDA device here")
    q_heads, kv_heads, dim = (int(x) for x in heads.split(","))
    rows = []
    for n in (int(x) for x in lengths.split(",")):
        rows.append(one_length(n, q_heads, kv_heads, dim))
        print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
