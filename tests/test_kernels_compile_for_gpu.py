"""Every kernel variant the CPU tests launch in Triton's interpreter also compiles for a Hopper GPU.

Without a GPU the kernel tests check values in the interpreter, which does not type-check as the
compiler does. This test reruns the kernel tests recording each launch's argument types
(``tests/launch_recorder.py``), then compiles every recorded signature for sm_90, with the fp8
and bf16 twins of the launches the interpreter cannot run (``tests/gpu_compile.py``, Triton's own
``ptxas``): a change that would only break on the GPU (a tensor of another dtype, a runtime value
where the compiler needs a constexpr) fails here, on a machine without one.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import gpu_compile

pytest.importorskip("triton", reason="Triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = [
    "tests/test_triton_kernels.py",
    "tests/test_triton_quantized_decode.py",
    "tests/test_triton_cache_update.py",
    "tests/test_triton_prefill_select.py",
    "tests/test_triton_prefill_attention.py",
    "tests/test_aot_kernels.py",
    "tests/test_fused_decode.py",
    "tests/test_fused_prefill.py",
    "tests/test_key_smoothing.py",
    "tests/test_kv_encode.py",
    "tests/test_engine.py",
]
KERNELS = {
    "decode_attention._split_kernel",
    "decode_attention._combine_kernel",
    "cache_update._score_kernel",
    "cache_update._commit_kernel",
    "prefill_select._bits_kernel",
    "prefill_select._move_kernel",
    "prefill_attention._attention_kernel",
    "prefill_attention._mass_kernel",
    "aot_attention.budgeted_attention_kernel",
    "aot_cache_update.budgeted_cache_update_kernel",
    "decode_gemv._gemv_kernel",
    "decode_gemv._sum_squares_kernel",
    "rope._rope_kernel",
    "prefill_layer._rms_norm_kernel",
    "prefill_layer._rope_heads_kernel",
    "prefill_layer._silu_gate_kernel",
    "kv_encode._encode_kernel",
}


def _ptxas() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the kernel tests compile every kernel themselves"
)
@pytest.mark.skipif(not _ptxas(), reason="this Triton has no ptxas to compile for a GPU")
def test_every_kernel_the_cpu_tests_launch_compiles_for_hopper(tmp_path):
    launches = tmp_path / "launches.json"
    recorded = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.launch_recorder",
            *KERNEL_TESTS,
        ],
        cwd=ROOT,
        env=os.environ | {"TRITON_INTERPRET": "1", "BAKLAVA_LAUNCHES": str(launches)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    result = gpu_compile.run(launches, "--arch", "90")
    assert result["failures"] == [], "\n\n".join(
        f"{name}:\n{message}" for name, message in result["failures"]
    )
    assert set(result["compiled"]) == KERNELS  # every kernel of the project, none missed
    # the formats and paths multiply a kernel's variants: the split kernel runs full precision,
    # int8, int4 (and fp8 twins), with and without H2O logits
    assert result["compiled"]["decode_attention._split_kernel"] >= 8
