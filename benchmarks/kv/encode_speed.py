"""What a layer's quantizing encode costs on the GPU: the one-launch kernel against PyTorch's ops.

:func:`baklava.runtime.kv_slots.encode` turns a step's new keys and values into quantized slots
(smoothed keys, payload and scales, the values attention reads back, the scaled query). On the
kernels it is one Triton launch (:mod:`baklava.kernels.kv_encode`) after the smoothing state's
update; the PyTorch path runs some forty elementwise kernels. Both are captured in a CUDA graph
and replayed (as a decode step runs), Llama-3-8B shapes (32 query heads, 8 KV heads, head dim
128, bf16), one layer; both paths' outputs must agree bit for bit::

    python benchmarks/kv/encode_speed.py                    # decode steps and prefill chunks
    python benchmarks/kv/encode_speed.py --cases 64x1,1x8192 --json out.json
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from baklava.bench.kernel_speed import _time
from baklava.eviction import EvictionConfig
from baklava.runtime import kv_slots
from baklava.runtime.packed_cache import BudgetedLayer

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _layer(kv_dtype: str, kernels: str, batch: int, first: bool) -> BudgetedLayer:
    layer = BudgetedLayer([64] * KV_HEADS, EvictionConfig(), kv_dtype)
    layer.decode_kernels = kernels
    shape = (batch, KV_HEADS, 1, HEAD_DIM)
    zeros = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    layer.lazy_initialization(zeros, zeros)
    if not first:  # a decode step: every row has seen its prompt, its smoothing state is fixed
        layer.valid_seen.fill_(1)
    return layer


def measure(kv_dtype: str, batch: int, seq: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, Q_HEADS, seq, HEAD_DIM, generator=gen, device="cuda").bfloat16()
    k, v = (
        torch.randn(batch, KV_HEADS, seq, HEAD_DIM, generator=gen, device="cuda").bfloat16() for _ in "kv"
    )
    first = seq > 1  # a prompt's first chunk fixes the state; a decode step keeps it
    paths = {name: _layer(kv_dtype, name, batch, first) for name in ("torch", "triton")}
    outs = {name: kv_slots.encode(layer, q, k, v) for name, layer in paths.items()}
    same = all(torch.equal(a, b) for a, b in zip(outs["torch"][:3], outs["triton"][:3], strict=True)) and all(
        torch.equal(outs["torch"][3][n], outs["triton"][3][n]) for n in outs["torch"][3]
    )
    ms = {
        name: _time(lambda layer=layer: kv_slots.encode(layer, q, k, v)) * 1e3
        for name, layer in paths.items()
    }
    return {
        "kv_dtype": kv_dtype,
        "batch": batch,
        "tokens": seq,
        "torch_ms": round(ms["torch"], 4),
        "kernel_ms": round(ms["triton"], 4),
        "speedup": round(ms["torch"] / ms["triton"], 2),
        "same_bits": same,
    }


@click.command()
@click.option(
    "--cases",
    default="8x1,64x1,256x1,1x4096,4x4096",
    show_default=True,
    help="Comma list of BATCHxTOKENS (1 token: a decode step; more: a prompt's first chunk).",
)
@click.option("--kv-dtypes", default="int8,fp8,int4", show_default=True)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows here."
)
def main(cases: str, kv_dtypes: str, json_out: Path | None) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("this benchmark times GPU kernels: no CUDA device here")
    try:
        shapes = [tuple(int(x) for x in c.lower().split("x")) for c in cases.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{cases!r} is not a comma list of BATCHxTOKENS", param_hint="--cases"
        ) from None
    rows = [measure(kv, b, s) for kv in kv_dtypes.split(",") for b, s in shapes]
    click.echo(f"encode of one layer, Llama-3-8B shapes, bf16, {torch.cuda.get_device_name()}")
    click.echo("| KV dtype | batch x tokens | PyTorch ms | kernel ms | speedup | same bits |")
    click.echo("|---|---|---|---|---|---|")
    for r in rows:
        click.echo(
            f"| {r['kv_dtype']} | {r['batch']}x{r['tokens']} | {r['torch_ms']} | {r['kernel_ms']} | "
            f"{r['speedup']}x | {r['same_bits']} |"
        )
    if json_out:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
