"""The decode-attention split kernel's machine code per KV format, compiled for a GPU on any machine.

Triton compiles for a target without the device; its wheel ships ``ptxas`` and ``cuobjdump``. This
script compiles ``_split_kernel`` for sm_90 (H100 / H200) at the launch the decode benchmark uses
(Llama-3-8B shapes: D = 128, GQA 4, 64-slot tiles, 4 warps, 2 stages), disassembles it and counts
its SASS instructions by opcode, with its registers. No timing: it shows what a format's slots
cost in instructions (conversions, byte permutes, shared-memory round trips: ``LDS`` against
``LDSM``), whether a launch spills (``STL`` / ``LDL``), and what a kernel change does to them,
on a machine without a GPU; only a GPU says what that costs in time. The int8 / fp8 rows of the
Gluon mma kernel (:mod:`baklava.kernels.decode_mma`, one warp, 16-slot steps, a ring of two 32-slot
chunks) follow::

    python benchmarks/kv/decode_sass.py                      # a table on stdout
    python benchmarks/kv/decode_sass.py --json out.json      # and the counts as JSON
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import triton

from baklava.kernels.decode_attention import _split_kernel
from baklava.kernels.decode_mma import split_launch as mma_launch
from baklava.kernels.offline_compile import compile_launch, instruction_mix

FORMATS = {"bf16": (0, "bfloat16", 1), "fp8": (1, "float8_e4m3fn", 1), "int4": (2, "uint8", 32),
           "int8": (3, "int8", 1)}  # fmt: skip
POINTERS = {"Q": "bfloat16", "KS": "float16", "VS": "float16", "FILL": "int64", "OFFSETS": "int32",
            "TILE_HEAD": "int32", "TILE_START": "int32", "MID_O": "float32", "MID_M": "float32",
            "MID_L": "float32", "LOGITS": "float32"}  # fmt: skip
ONE_SCALE_A_SLOT = {"stride_ksb", "stride_kst", "stride_vsb", "stride_vst", "stride_fb"}  # stride 1


def split_launch(fmt: str, *, block_n: int, warps: int, stages: int) -> dict:
    """The split kernel's launch over slots in ``fmt`` (Llama-3-8B shapes; pointers and strides
    16-aligned except the one-a-slot ones), described for :mod:`baklava.kernels.offline_compile`."""
    quant, payload, group = FORMATS[fmt]
    scales = "int16" if fmt == "int4" else "float16"  # int4: two-level scales as int16 words (kv_format)
    tensors = POINTERS | {"K": payload, "V": payload, "KS": scales, "VS": scales}
    consts = dict(GROUP=4, G_PAD=16, D=128, BLOCK_N=block_n, STORE_LOGITS=False, PDL=False,
                  QUANT=quant, SCALE_GROUP=group)  # fmt: skip
    args = []
    for name in _split_kernel.arg_names:
        if name in consts:
            args.append(
                ["int", consts[name]] if not isinstance(consts[name], bool) else ["bool", consts[name]]
            )
        elif name in tensors:
            args.append(["tensor", tensors[name], True])
        elif name == "scale":
            args.append(["float", 0.088])
        else:
            args.append(["int", 1 if name in ONE_SCALE_A_SLOT else 4096])
    options = {"num_warps": ["int", warps], "num_stages": ["int", stages]}
    return {"module": _split_kernel.__module__, "name": "_split_kernel", "jit": {}, "args": args,
            "kwargs": options}  # fmt: skip


def compile_split(fmt: str, *, arch: int, block_n: int, warps: int, stages: int) -> bytes:
    """The cubin of the split kernel for slots in ``fmt``."""
    launch = split_launch(fmt, block_n=block_n, warps=warps, stages=stages)
    return compile_launch(launch, arch).asm["cubin"]


@click.command()
@click.option("--arch", default=90, show_default=True, help="Compute capability, e.g. 90 for H100 / H200.")
@click.option("--block-n", default=64, show_default=True)
@click.option("--warps", default=4, show_default=True)
@click.option("--stages", default=2, show_default=True)
@click.option("--show", default="I2F,I2FP,F2FP,PRMT,HADD2,HMMA,LDS,LDSM,LDGSTS", show_default=True,
              help="Opcodes to print as columns.")  # fmt: skip
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the counts."
)
def main(arch: int, block_n: int, warps: int, stages: int, show: str, json_out: Path | None) -> None:
    columns = show.split(",")
    rows = {}
    click.echo("| format | registers | instructions | " + " | ".join(columns) + " |")
    click.echo("|---" * (3 + len(columns)) + "|")
    cubins = {
        fmt: compile_split(fmt, arch=arch, block_n=block_n, warps=warps, stages=stages) for fmt in FORMATS
    }
    for quant, fmt in ((3, "int8"), (1, "fp8")):  # the Gluon kernel: one warp, operands in registers
        cubins[f"{fmt} mma"] = compile_launch(mma_launch(quant, head_dim=128, group=4), arch).asm["cubin"]
    for fmt, cubin in cubins.items():
        mix = instruction_mix(cubin)
        rows[fmt] = mix
        cells = [str(mix["opcodes"].get(op, 0)) for op in columns]
        click.echo(f"| {fmt} | {mix['registers']} | {mix['total']} | " + " | ".join(cells) + " |")
    if json_out:
        meta = {
            "arch": arch,
            "block_n": block_n,
            "warps": warps,
            "stages": stages,
            "triton": triton.__version__,
        }
        json_out.write_text(json.dumps({"meta": meta, "formats": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
