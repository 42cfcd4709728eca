"""The Triton rounding of token-head vectors (:mod:`baklava.kernels.kv_rounding`) against
:func:`baklava.kv_format.round_trip`, bit for bit: in the interpreter on the CPU (CI), on the GPU
where there is one. ``test_tensorrt.py`` compiles the plugins' kernels that use it for sm_90."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from baklava import kv_format  # noqa: E402
from baklava.errors import BaklavaError  # noqa: E402
from baklava.kernels.kv_rounding import round_rows, rounding  # noqa: E402
from tests.triton_env import DEVICE  # noqa: E402


@triton.jit
def _round_kernel(X, Y, ROWS: tl.constexpr, D: tl.constexpr, KV_QUANT: tl.constexpr, KV_GROUP: tl.constexpr):
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    x = tl.load(X + r[:, None] * D + d[None, :])
    tl.store(Y + r[:, None] * D + d[None, :], round_rows(x, KV_QUANT, KV_GROUP, ROWS, D))


def hard_rows(head_dim: int, seed: int) -> torch.Tensor:
    """64 vectors over nine decades of scale, with the cases rounding gets wrong first: zeros,
    vectors under the smallest scale, exact halves (ties), one outlier channel, float8's top,
    negative values that round to zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, head_dim, generator=gen) * torch.logspace(-6, 3, 64)[:, None]
    x[0] = 0.0
    x[1, :3] = 1e-9
    x[2] = torch.arange(head_dim) * 0.5
    x[3, 5] = 300.0
    x[4] = torch.linspace(-448.0, 448.0, head_dim)
    x[5] = 0.0  # fp8 at scale 1: ties below the smallest step round to 0 and keep their sign
    x[5, :4] = torch.tensor([448.0, -(2.0**-10), -(2.0**-11), -0.0])
    return x


@pytest.mark.parametrize(
    ("name", "head_dim"), [("fp8", 16), ("fp8", 128), ("int8", 64), ("int4", 32), ("int4", 128)]
)
def test_rows_round_as_the_format_reference_bit_for_bit(name, head_dim):
    x = hard_rows(head_dim, seed=head_dim).to(DEVICE)
    y = torch.empty_like(x)
    consts = rounding(name, head_dim)
    _round_kernel[(1,)](x, y, 64, head_dim, **consts, enable_fp_fusion=consts["KV_QUANT"] != 2)
    want = kv_format.round_trip(x, kv_format.parse(name))
    assert torch.equal(y, want)
    assert not torch.equal(y, x)  # it did round


def test_full_precision_is_left_alone_and_bad_head_dims_fail_in_one_line():
    assert rounding("auto", 96) == {"KV_QUANT": 0, "KV_GROUP": 96}
    assert rounding("int8", 96) == {"KV_QUANT": 3, "KV_GROUP": 96}
    with pytest.raises(BaklavaError, match="int4 needs a power-of-two head dimension, got 96"):
        rounding("int4", 96)
