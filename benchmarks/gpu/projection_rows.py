"""A decode step's four projections at ``M`` rows: decode_gemv's Triton kernels against cuBLAS.

One Llama-3-8B layer's q/k/v, o, gate/up and down projections with what surrounds them, two ways:

* ``gemv``: :mod:`baklava.kernels.decode_gemv` (RMSNorm in the prologue, residual add / SiLU x up
  in the epilogue; the fused decode step's path up to ``fused_decode.GEMV_ROWS`` rows);
* ``cublas``: ``F.linear`` with :mod:`baklava.kernels.prefill_layer`'s RMSNorm and SiLU x up
  kernels and eager residual adds (the fused chunk forward's path, taken above it).

Each is captured in a CUDA graph over 8 layers' distinct weights (so the weights come from HBM,
not L2) and replayed; the attention is left out (its output stands in as the q columns). Prints
and writes (``--json``) milliseconds a layer for each row count::

    python benchmarks/gpu/projection_rows.py --json projection-rows.json
"""

from __future__ import annotations

import json
import types

import click
import torch
import torch.nn.functional as F

from baklava.kernels import decode_gemv
from baklava.kernels.prefill_layer import rms_norm, silu_gate

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM, EPS = 4096, 14336, 32, 8, 128, 1e-5
LAYERS = 8


def _layer(gen: torch.Generator) -> types.SimpleNamespace:
    def w(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda") * shape[-1] ** -0.5).to(torch.bfloat16)

    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    ones = torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda")
    return types.SimpleNamespace(
        qkv=w(qkv, HIDDEN),
        o=w(HIDDEN, HIDDEN),
        gate_up=w(2 * INTER, HIDDEN),
        down=w(HIDDEN, INTER),
        norm=ones,
    )


def gemv_layer(x: torch.Tensor, w) -> torch.Tensor:
    qkv = decode_gemv.norm_linear(x, decode_gemv.sum_squares(x), w.norm, EPS, w.qkv)
    y, ss = decode_gemv.linear_residual(qkv[:, :HIDDEN].contiguous(), w.o, x)
    act = decode_gemv.norm_linear_silu(y, ss, w.norm, EPS, w.gate_up)
    return decode_gemv.linear_residual(act, w.down, y)[0]


def cublas_layer(x: torch.Tensor, w) -> torch.Tensor:
    qkv = F.linear(rms_norm(x, w.norm, EPS), w.qkv)
    y = x + F.linear(qkv[:, :HIDDEN].contiguous(), w.o)
    act = silu_gate(F.linear(rms_norm(y, w.norm, EPS), w.gate_up))
    return y + F.linear(act, w.down)


def time_graph(layer_fn, x: torch.Tensor, layers, replays: int = 20) -> float:
    """Milliseconds a layer of ``layer_fn`` over ``layers`` in one CUDA graph."""

    def run():
        h = x
        for w in layers:
            h = layer_fn(h, w)
        return h

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays / len(layers)


@click.command()
@click.option("--rows", default="1,8,16,32,48,64,96,128,192,256,384,466", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@torch.inference_mode()
def main(rows: str, json_path: str | None) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [_layer(gen) for _ in range(LAYERS)]
    out = {"device": torch.cuda.get_device_name(), "ms_per_layer": {}}
    for m in (int(r) for r in rows.split(",")):
        x = torch.randn(m, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
        gemv, cublas = time_graph(gemv_layer, x, layers), time_graph(cublas_layer, x, layers)
        out["ms_per_layer"][m] = {"gemv": round(gemv, 4), "cublas": round(cublas, 4)}
        print(
            f"{m:4d} rows: gemv {gemv:.4f} ms, cuBLAS {cublas:.4f} ms a layer ({cublas / gemv:.2f}x)",
            flush=True,
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
