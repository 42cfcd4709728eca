"""The Gluon mma split kernel (int8 / fp8 decode attention) compiles for Hopper on any machine,
with the machine code its design stands on.

Gluon kernels do not run in Triton's interpreter: their values are tested on a CUDA device
(``tests/test_triton_quantized_decode.py``, against the Triton kernel and the reference). Here,
without one, each variant is compiled for sm_90 with Triton's own ``ptxas``; the kernel asserts
at compile time that the renamed key and value tiles and the probabilities are already in the
tensor-core operand layouts (``convert_layout(..., assert_trivial=True)``), and this test checks
what that should give: no spills, no ``ldmatrix``, 16-byte ``cp.async`` into the ring, and one
``mma.sync`` per 16 x 8 x 16 block of a step and no more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
VARIANTS = [(3, 128, 4, False), (1, 128, 4, True), (3, 64, 7, True), (1, 32, 2, False)]
COMPILE = """
import json, sys
from baklava.kernels.decode_mma import split_launch
from baklava.kernels.offline_compile import compile_launch, instruction_mix
for quant, head_dim, group, store in json.loads(sys.argv[1]):
    launch = split_launch(quant, head_dim=head_dim, group=group, store_logits=store)
    print(json.dumps(instruction_mix(compile_launch(launch, 90).asm["cubin"])))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Each variant's instruction mix, compiled in a process without the interpreter (the tests
    run under it, and Gluon kernels compile only without it)."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(VARIANTS)],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(zip(VARIANTS, map(json.loads, done.stdout.splitlines()), strict=True))


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no ptxas to compile for a GPU")
@pytest.mark.parametrize(("quant", "head_dim", "group", "store"), VARIANTS)
def test_mma_split_kernel_compiles_for_hopper_with_operands_built_in_registers(
    compiled, quant, head_dim, group, store
):
    mix = compiled[(quant, head_dim, group, store)]
    ops = mix["opcodes"]
    assert ops.get("STL", 0) == ops.get("LDL", 0) == 0, "spilled"
    assert "LDSM" not in ops  # no operand goes through ldmatrix
    # a chunk (32 slots) of keys and of values, whole slots a copy: 32 x D bytes in 512-byte
    # warp-wide copies of 16 bytes a thread, for the prologue's chunk and the loop's one
    per_chunk = 2 * (32 * head_dim // 512)
    assert ops["LDGSTS"] == 2 * per_chunk
    # a chunk's two steps, each QK^T: D / 16 k-steps x 2 n-tiles; P @ V: D / 8 n-tiles x 1 k-step
    assert ops["HMMA"] == 2 * (head_dim // 8 + head_dim // 8)
    # 8 programs an SM: two warps share each sub-partition's 16,384 registers (<= 256 a thread)
    assert mix["registers"] <= 256
    assert ("F2FP" if quant == 1 else "HADD2") in ops  # e4m3x2 -> f16x2 / int8 via 1024 + v
