"""The decode-attention kernel over quantized slots against the reference: dequantize, then attend.

The payload and its scales go to the kernel; the reference gets :func:`baklava.kv_format.dequantize`
of the same payload (the issue's contract: quantize -> dequantize -> today's path). On a CUDA
device, or in Triton's interpreter (which has no float8: fp8 runs on the GPU only).
"""

import pytest
import torch

from baklava import kv_format
from tests.test_triton_kernels import TOLERANCE, _case
from tests.triton_env import DEVICE, INTERPRETED

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.kernels.decode_attention import packed_decode_attention, tiled  # noqa: E402
from baklava.kernels.reference import packed_decode_attention as reference  # noqa: E402

FP8 = pytest.param("fp8", marks=pytest.mark.skipif(INTERPRETED, reason="numpy has no float8"))


@pytest.mark.parametrize("name", ["int8", "int4", FP8])
@pytest.mark.parametrize(
    ("batch", "caps", "q_heads", "head_dim"),
    [
        (3, [100, 7, 1000, 33], 8, 64),  # GQA 2, fills differ per row, a head that splits
        (2, [1229] * 8, 32, 128),  # Llama-3-8B shapes
    ],
)
def test_quantized_slots_match_the_dequantized_reference(name, batch, caps, q_heads, head_dim):
    fmt = kv_format.parse(name)
    (query, k_new, v_new, keys, values, fill), offsets = _case(
        batch + 11, batch, caps, q_heads, head_dim, torch.float16
    )
    keys = keys * torch.linspace(0.05, 4, head_dim, device=DEVICE, dtype=keys.dtype)  # uneven channels
    (kq, ks), (vq, vs) = kv_format.quantize(keys, fmt), kv_format.quantize(values, fmt)
    scale = head_dim**-0.5
    got = packed_decode_attention(
        query, k_new, v_new, kq, vq, fill, offsets, caps, scale, kv_format=fmt, key_scales=ks, value_scales=vs
    )
    k_deq, v_deq = kv_format.dequantize(kq, ks, fmt), kv_format.dequantize(vq, vs, fmt)
    want = reference(query, k_new, v_new, k_deq, v_deq, fill, caps, scale)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[torch.float16] * 2, rtol=0)
    # and the quantization is visible: the full-precision slots give another answer
    plain = reference(query, k_new, v_new, keys, values, fill, caps, scale)
    assert (plain - want).abs().max() > (1e-3 if name == "int8" else 1e-2)


def test_scales_are_read_per_slot_not_per_head():
    """One slot's scale doubled: only the rows whose head owns that slot change."""
    fmt = kv_format.parse("int8")
    caps = [40, 24]
    (query, k_new, v_new, keys, values, fill), offsets = _case(
        3, 2, caps, 4, 64, torch.float16, [[40, 24]] * 2
    )
    (kq, ks), (vq, vs) = kv_format.quantize(keys, fmt), kv_format.quantize(values, fmt)
    run = lambda vs_: packed_decode_attention(  # noqa: E731
        query,
        k_new,
        v_new,
        kq,
        vq,
        fill,
        offsets,
        caps,
        0.125,
        kv_format=fmt,
        key_scales=ks,
        value_scales=vs_,
    )
    before = run(vs)
    bumped = vs.clone()
    bumped[1, 45] *= 2  # row 1, head 1's sixth slot
    after = run(bumped)
    changed = (after - before).abs().amax(-1) > 1e-4  # [B, H_q]
    assert changed.tolist() == [[False, False, False, False], [False, False, True, True]]


ON_GPU = not INTERPRETED and DEVICE == "cuda"
# the deployed ring (two chunks of two 16-slot steps), then chunks of one step (three or two of
# them) and of four steps: each reads the same slots in another order of copies and steps
MMA_LAUNCHES = [
    {},
    dict(mma_sub=1, mma_stages=3),
    dict(mma_sub=1, mma_stages=2),
    dict(mma_sub=4, mma_stages=2),
]
MMA_NAMES = ["int8", pytest.param("fp8", marks=pytest.mark.skipif(not ON_GPU, reason="fp8 needs the GPU"))]


@pytest.mark.skipif(not ON_GPU, reason="the mma split kernel (Gluon) runs on a CUDA device only")
@pytest.mark.parametrize("name", MMA_NAMES)
@pytest.mark.parametrize(
    ("batch", "caps", "q_heads", "head_dim", "fills"),
    [
        (3, [100, 7, 1000, 33], 8, 64, None),  # GQA 2, fills differ per row, a head that splits
        (2, [1229] * 8, 32, 128, None),  # Llama-3-8B shapes
        (2, [300, 45, 2000], 21, 64, None),  # Qwen2.5-like group of 7
        (2, [50, 300], 4, 32, [[0, 300], [50, 1]]),  # an empty head, a full one, one live slot
        (1, [4096, 17], 32, 128, None),  # the largest group (16 query heads a KV head)
    ],
)
def test_mma_split_kernel_matches_the_triton_kernel_and_the_reference(
    name, batch, caps, q_heads, head_dim, fills
):
    """The Gluon split pass (operands built in registers, channels renamed) gives the Triton
    kernel's output, logits, log-sum-exps and the dequantized reference."""
    fmt = kv_format.parse(name)
    (query, k_new, v_new, keys, values, fill), offsets = _case(
        batch * 5 + head_dim, batch, caps, q_heads, head_dim, torch.bfloat16, fills
    )
    keys = keys * torch.linspace(0.05, 4, head_dim, device=DEVICE, dtype=keys.dtype)  # uneven channels
    (kq, ks), (vq, vs) = kv_format.quantize(keys, fmt), kv_format.quantize(values, fmt)
    scale = head_dim**-0.5
    group = q_heads // len(caps)
    runs = {}
    launches = [("triton", True, {})] + [("mma", i, how) for i in (True, False) for how in MMA_LAUNCHES]
    launches.append(("mma", True, {"table": tiled(caps, 96, DEVICE)}))  # a pool's table: tiles of one length
    for index, (kernel, interleave, how) in enumerate(launches):
        logits = torch.full((batch, sum(caps), group), 7.0, device=DEVICE)
        lse = torch.empty(batch, q_heads, device=DEVICE)
        logit_new = torch.empty(batch, q_heads, device=DEVICE)
        out = packed_decode_attention(
            query, k_new, v_new, kq, vq, fill, offsets, caps, scale, kv_format=fmt, key_scales=ks,
            value_scales=vs, logits=logits, lse=lse, logit_new=logit_new, kernel=kernel,
            mma_interleave=interleave, **how,
        )  # fmt: skip
        runs[index] = out.float(), logits, lse
    k_deq, v_deq = kv_format.dequantize(kq, ks, fmt), kv_format.dequantize(vq, vs, fmt)
    want = reference(query, k_new, v_new, k_deq, v_deq, fill, caps, scale)
    out_t, logits_t, lse_t = runs.pop(0)
    for out, logits, lse in runs.values():  # a head's chunks in turn or one tile, each ring
        torch.testing.assert_close(out, want, atol=TOLERANCE[torch.bfloat16], rtol=0)
        torch.testing.assert_close(out, out_t, atol=4e-3, rtol=0)
        torch.testing.assert_close(lse, lse_t, atol=1e-3, rtol=0)
        torch.testing.assert_close(logits, logits_t, atol=1e-3, rtol=1e-3)  # dead slots keep the 7.0


def test_auto_takes_the_gluon_kernel_only_where_it_runs():
    """The interpreter cannot run Gluon: off CUDA every format takes the Triton kernel, whose
    tile table keeps its four-warp programs; an unknown kernel, or the mma kernel asked for slots
    whose rows it cannot copy in 16-byte pieces, is a clear error."""
    from baklava.kernels.decode_attention import mma_split, split_programs_per_sm

    for name in ("int8", "fp8", "int4", "bf16"):
        assert not mma_split(kv_format.parse(name), 128, 4, "cpu")
    assert (split_programs_per_sm(8, mma=False), split_programs_per_sm(8, mma=True)) == (4, 8)
    fmt = kv_format.parse("int8")
    (query, k_new, v_new, keys, values, fill), offsets = _case(5, 1, [40, 24], 4, 64, torch.float16)
    (kq, ks), (vq, vs) = kv_format.quantize(keys, fmt), kv_format.quantize(values, fmt)
    with pytest.raises(ValueError, match="kernel must be"):
        packed_decode_attention(
            query, k_new, v_new, kq, vq, fill, offsets, [40, 24], 0.125, kv_format=fmt, key_scales=ks,
            value_scales=vs, kernel="fast",
        )  # fmt: skip
    flat = torch.zeros(kq.numel() + 4, dtype=kq.dtype, device=kq.device)
    shifted = flat[4:].view(kq.shape)  # rows 4 bytes off a 16-byte boundary
    shifted.copy_(kq)
    with pytest.raises(ValueError, match="16-byte rows"):
        packed_decode_attention(
            query, k_new, v_new, shifted, vq, fill, offsets, [40, 24], 0.125, kv_format=fmt,
            key_scales=ks, value_scales=vs, kernel="mma",
        )  # fmt: skip
    # "auto" takes the Triton kernel for such slots (and off CUDA for any): the same answer
    got = packed_decode_attention(
        query, k_new, v_new, shifted, vq, fill, offsets, [40, 24], 0.125, kv_format=fmt, key_scales=ks,
        value_scales=vs,
    )  # fmt: skip
    want = packed_decode_attention(
        query, k_new, v_new, kq, vq, fill, offsets, [40, 24], 0.125, kv_format=fmt, key_scales=ks,
        value_scales=vs, kernel="triton",
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="the mma split kernel (Gluon) runs on a CUDA device only")
def test_auto_picks_the_mma_kernel_for_8_bit_slots_only():
    from baklava.kernels.decode_attention import mma_split

    assert mma_split(kv_format.parse("int8"), 128, 4, DEVICE) == (
        torch.cuda.get_device_capability() >= (8, 9)
    )
    assert not mma_split(kv_format.parse("int4"), 128, 4, DEVICE)
    assert not mma_split(None, 128, 4, DEVICE)
    assert not mma_split(kv_format.parse("int8"), 16, 4, DEVICE)  # a 16-channel slot is one word a quad
    assert not mma_split(kv_format.parse("int8"), 128, 32, DEVICE)  # more query heads than mma rows
    assert not mma_split(kv_format.parse("int8"), 256, 4, DEVICE)  # its accumulator would spill
    # one sequence alone: the Triton kernel (3-4% faster there); two or more: the mma kernel
    assert not mma_split(kv_format.parse("int8"), 128, 4, DEVICE, rows=1)
    assert mma_split(kv_format.parse("fp8"), 128, 4, DEVICE, rows=2) == mma_split(
        kv_format.parse("fp8"), 128, 4, DEVICE
    )
