"""The one-launch quantizing encode (:mod:`baklava.kernels.kv_encode`) against the PyTorch path
of :func:`baklava.runtime.kv_slots.encode`, bit for bit: every output (the scaled query, payload,
scales, the keys and values the slots give back) and the smoothing state, for prefill chunks and
decode steps, first rows and later ones, padding, GQA, strided inputs. In Triton's interpreter on
the CPU (CI), on the GPU where there is one."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.eviction import EvictionConfig  # noqa: E402
from baklava.runtime import kv_slots  # noqa: E402
from baklava.runtime.packed_cache import BudgetedLayer  # noqa: E402
from tests.triton_env import DEVICE, INTERPRETED  # noqa: E402

CAPS = [20, 40]  # two KV heads


def two_layers(kv_dtype, smooth, batch, head_dim, dtype):
    """The same fresh layer twice: on the PyTorch path and on the kernels."""
    layers = []
    for kernels in ("torch", "triton"):
        layer = BudgetedLayer(CAPS, EvictionConfig(), kv_dtype)
        layer.smooth_keys = smooth
        layer.decode_kernels = kernels
        shape = (batch, len(CAPS), 1, head_dim)
        layer.lazy_initialization(
            torch.zeros(shape, dtype=dtype, device=DEVICE), torch.zeros(shape, dtype=dtype, device=DEVICE)
        )
        layers.append(layer)
    return layers


def step(gen, batch, seq, q_heads, head_dim, dtype):
    """Query, keys and values of one step; keys and values strided as a projection leaves them."""
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen)
    kv = torch.randn(batch, seq, 2, len(CAPS), head_dim, generator=gen) * torch.logspace(-2, 1, head_dim)
    kv[..., 3] += 4.0  # an offset channel, as a k-projection bias leaves one (what smoothing removes)
    keys, values = (kv[:, :, i].transpose(1, 2) for i in range(2))  # [B, H_kv, S, D], not contiguous
    return (t.to(DEVICE, dtype) for t in (q, keys, values))


BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        INTERPRETED,
        reason="the interpreter truncates float32 to bfloat16 (a GPU rounds to nearest, as PyTorch)",
    ),
)


@pytest.mark.parametrize(("kv_dtype", "head_dim"), [("int8", 32), ("fp8", 32), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_the_kernel_encodes_as_the_pytorch_path_bit_for_bit(kv_dtype, head_dim, smooth, dtype):
    batch, q_heads = 3, 8
    gen = torch.Generator().manual_seed(11)
    reference, fused = two_layers(kv_dtype, smooth, batch, head_dim, dtype)
    real = torch.ones(batch, 20, dtype=torch.bool, device=DEVICE)
    real[1, :6] = False  # a left-padded row
    for seq, mask in [(20, real), (1, None), (17, None), (1, None)]:  # chunks cross a 16-token block
        q, k, v = step(gen, batch, seq, q_heads, head_dim, dtype)
        want = kv_slots.encode(reference, q, k, v, mask)
        got = kv_slots.encode(fused, q, k, v, mask)
        for name in ("query", "keys", "values"):
            i = ("query", "keys", "values").index(name)
            assert got[i].dtype == want[i].dtype and torch.equal(got[i], want[i]), name
        assert set(got[3]) == set(want[3]) == {"keys", "values", "key_scales", "value_scales"}
        for name, t in want[3].items():
            assert got[3][name].dtype == t.dtype and torch.equal(got[3][name], t), name
        if smooth:
            assert torch.equal(fused.key_mean, reference.key_mean)
            assert torch.equal(fused.key_scale, reference.key_scale)
        for layer in (reference, fused):  # the rows have now seen tokens: their state is fixed
            layer.valid_seen += seq
    assert not torch.equal(got[1], k)  # the keys came back rounded


def test_the_kernel_is_used_for_quantized_formats_on_the_kernels():
    from baklava import kv_format
    from baklava.kernels.kv_encode import takes

    assert takes(kv_format.parse("int8"), 128) and takes(kv_format.parse("fp8"), 64)
    assert takes(kv_format.parse("int4"), 128) and takes(kv_format.parse("int4"), 32)
    assert not takes(kv_format.parse("int8"), 96) and not takes(kv_format.parse("int4"), 16)
    assert not takes(kv_format.parse("auto"), 128)
    torch_path, kernels = two_layers("int8", True, 1, 16, torch.float32)
    keys = torch.zeros(1, 2, 1, 16, device=DEVICE)
    assert not kv_slots._fused(torch_path, keys) and kv_slots._fused(kernels, keys)
    assert kv_slots._fused(kernels, torch.zeros(1, 2, 9, 16, device=DEVICE))  # a chunk too
    _, int4 = two_layers("int4", True, 1, 32, torch.float32)
    step, chunk = torch.zeros(1, 2, 1, 32, device=DEVICE), torch.zeros(1, 2, 9, 32, device=DEVICE)
    assert kv_slots._fused(int4, step) and kv_slots._fused(int4, chunk)


@pytest.mark.parametrize("head_dim", [32, 128])
def test_int4_chunks_encode_as_the_format_reference(head_dim):
    """The kernel's int4 chunk path, called directly: payload, scale words and the values read
    back equal :func:`baklava.kv_format.quantize` / ``dequantize``, bit for bit (on a GPU too
    since the reference divides by a device tensor, not by a Python scalar)."""
    from baklava import kv_format
    from baklava.kernels import kv_encode

    fmt = kv_format.parse("int4")
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = step(gen, 2, 40, 8, head_dim, torch.float32)
    _, slots, k_back, v_back = kv_encode.encode(q, k, v, fmt)
    for x, back, payload, scales in (
        (k, k_back, "keys", "key_scales"),
        (v, v_back, "values", "value_scales"),
    ):
        want_payload, want_scales = kv_format.quantize(x, fmt)
        assert torch.equal(slots[payload], want_payload) and torch.equal(slots[scales], want_scales)
        assert torch.equal(back, kv_format.dequantize(want_payload, want_scales, fmt, x.dtype))
