"""The decode-attention kernel against its PyTorch reference.

On a CUDA device, or in Triton's interpreter on the CPU (same kernel source, numpy semantics:
it checks indexing, masking and the online softmax, not GPU numerics); skipped without Triton.
"""

import numpy as np
import pytest
import torch

from tests.triton_env import DEVICE, INTERPRETED

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table  # noqa: E402
from baklava.kernels.reference import packed_decode_attention as reference  # noqa: E402

# fp16/bf16 inputs, fp32 accumulation: outputs within these of the fp32 reference
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(INTERPRETED, reason="the interpreter reads bfloat16 as garbage (numpy)"),
)


def _case(seed, batch, caps, q_heads, head_dim, dtype, fills=None):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, total = len(caps), sum(caps)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEVICE)  # noqa: E731
    if fills is None:
        fills = [[int(torch.randint(0, c + 1, (1,), generator=gen)) for c in caps] for _ in range(batch)]
    fill = torch.tensor(fills, dtype=torch.int32).to(DEVICE)
    args = (
        rand(batch, q_heads, head_dim),
        rand(batch, kv_heads, head_dim),
        rand(batch, kv_heads, head_dim),
        rand(batch, total, head_dim),
        rand(batch, total, head_dim),
        fill,
    )
    offsets = torch.tensor(np.cumsum([0, *caps[:-1]]), dtype=torch.int32).to(DEVICE)
    return args, offsets


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize(
    ("batch", "caps", "q_heads", "head_dim"),
    [
        (1, [1, 5, 64], 3, 64),  # capacity 1, capacities not a multiple of the block
        (3, [100, 7, 1000, 33], 8, 64),  # GQA 2, different fill per row
        (2, [4096, 513, 1], 9, 64),  # SmolLM2-like group of 3, a long head that splits
        (4, [1229] * 8, 32, 128),  # Llama-3-8B shapes
        (1, [17, 1], 2, 128),
    ],
)
def test_matches_reference(dtype, batch, caps, q_heads, head_dim):
    args, offsets = _case(len(caps) * 7 + batch, batch, caps, q_heads, head_dim, dtype)
    scale = head_dim**-0.5
    got = packed_decode_attention(*args, offsets, caps, scale)
    want = reference(*args, caps, scale)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_empty_and_full_heads():
    caps = [50, 300]
    args, offsets = _case(1, 2, caps, 4, 64, torch.float16, fills=[[0, 300], [50, 0]])
    got = packed_decode_attention(*args, offsets, caps, 0.125)
    torch.testing.assert_close(got.float(), reference(*args, caps, 0.125), atol=2e-3, rtol=2e-3)
    # a head with nothing stored attends only to the step's own token: output == its value
    value_new = args[2]
    torch.testing.assert_close(got[0, :2].float(), value_new[0, 0].float().expand(2, -1), atol=1e-3, rtol=0)


@pytest.mark.parametrize(("tile", "merge_block"), [(64, 4), (64, 32), (128, 32), (4096, 32)])
def test_every_tile_size_gives_the_same_answer(tile, merge_block):
    # tile 64: the 4097-slot head has 65 tiles, merged 4 (17 blocks) or 32 (3 blocks) at a time
    caps = [1, 200, 1000, 4097]
    args, offsets = _case(5, 2, caps, 8, 64, torch.float16)
    table = (tile, tile_table(caps, tile, DEVICE))
    got = packed_decode_attention(*args, offsets, caps, 0.125, table=table, merge_block=merge_block)
    torch.testing.assert_close(got.float(), reference(*args, caps, 0.125), atol=2e-3, rtol=2e-3)


def test_tile_table_covers_every_slot_once():
    caps = [1, 63, 64, 65, 4096]
    tile = tile_length(caps, batch=8, block_n=64, sms=132)
    head, start, first = (t.tolist() for t in tile_table(caps, tile, "cpu"))
    for h, cap in enumerate(caps):
        starts = [s for hh, s in zip(head, start, strict=True) if hh == h]
        assert starts == list(range(0, max(cap, 1), tile)) and first[h + 1] - first[h] == len(starts)


def test_the_benchmark_case_feeds_the_kernel_in_its_argument_order():
    from baklava.bench.kernel_speed import HKV, packed_case

    case = packed_case(2, 512, 0.3, device=DEVICE, dtype=torch.float16)
    assert sum(case.caps) == round(0.3 * 512 * HKV) and case.keys.shape == (2, sum(case.caps), 128)
    assert case.fill.tolist() == [case.caps] * 2 and case.offsets.tolist() == list(
        np.cumsum([0, *case.caps[:-1]])
    )
    kd, vd = case.dense_same()
    assert kd.shape == vd.shape == (2, HKV, sum(case.caps) // HKV, 128)
    args = case.args()
    got = packed_decode_attention(*args)
    want = reference(*args[:6], case.caps, args[-1])
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
