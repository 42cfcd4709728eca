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
    assert mix["registers"] <= 255
    assert "LDSM" not in ops  # no operand goes through ldmatrix
    # a step's key and value tiles: D / 4 bytes a slot a thread for the keys, D / 8 for the values,
    # in 16-byte copies (8-byte at D = 32), for the prologue's two stages and the loop's one
    per_step = max(1, head_dim // 64) * 2 + max(1, head_dim // 128) * 4
    assert ops["LDGSTS"] == 3 * per_step
    # QK^T: D / 16 k-steps x 2 n-tiles; P @ V: D / 8 n-tiles x 1 k-step
    assert ops["HMMA"] == head_dim // 8 + head_dim // 8
    assert ("F2FP" if quant == 1 else "HADD2") in ops  # e4m3x2 -> f16x2 / int8 via 1024 + v
