"""Split-pass tables (baklava/kernels/tile_tables.py): every slot read once in either reading of a
table, the mma kernel's programs one wave spread so the longest reads as few steps as it can,
and the merge launch each table asks for. CPU only: tables are built on the host."""

import itertools
import math
import random

import pytest
import torch

from baklava.bench.kernel_speed import HKV, uneven_caps
from baklava.kernels.decode_attention import MMA_MIN_CHUNKS, split_table
from baklava.kernels.tile_tables import (
    SplitTable,
    balanced_counts,
    balanced_table,
    merge_launch,
    merge_warps,
    tile_length,
    tiled,
)

LLAMA_8_AT_32K = uneven_caps(32768, 0.3, HKV)  # the decode benchmark's layer: 8 heads, 2.4k-22k slots


def _reads(table: SplitTable, capacities, chunk: int) -> tuple[list, list]:
    """Slots each program reads, both ways the kernels read a table: interleaved (program ``j`` of
    a head's ``c`` reads chunks ``j, j + c, ...``) and contiguous (``tile`` slots from its start)."""
    heads, starts, first = (t.tolist() for t in table.tensors)
    interleaved, contiguous = [], []
    for t, (h, start) in enumerate(zip(heads, starts, strict=True)):
        count, j = first[h + 1] - first[h], t - first[h]
        cap = capacities[h]
        steps = range(j * chunk, cap, count * chunk)
        interleaved.append([(h, n) for s in steps for n in range(s, min(s + chunk, cap))])
        contiguous.append([(h, n) for n in range(start, min(start + table.tile, cap))])
    return interleaved, contiguous


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch", [1, 3, 8, 40, 300])
def test_balanced_table_reads_every_slot_once_either_way(seed, batch):
    rng = random.Random(seed * 100 + batch)
    caps = [rng.choice([0, 1, 31, 32, 33, rng.randrange(1, 30000)]) for _ in range(rng.randrange(1, 9))]
    table = balanced_table(caps, batch, 32, sms=132, per_sm=8, device="cpu", min_steps=MMA_MIN_CHUNKS)
    want = sorted((h, n) for h, cap in enumerate(caps) for n in range(cap))
    for reading in _reads(table, caps, 32):
        assert sorted(s for program in reading for s in program) == want
    counts = [b - a for a, b in itertools.pairwise(table.tensors[2].tolist())]
    assert min(counts) >= 1 and table.most == max(counts) and table.tile % 32 == 0
    steps = sum(max(1, math.ceil(c / 32)) for c in caps)
    assert sum(counts) == max(len(caps), min(8 * 132 // batch, math.ceil(steps / MMA_MIN_CHUNKS)))


def test_balanced_counts_minimise_the_longest_program():
    """Against every split of 3-14 programs over three heads of 50, 7 and 19 steps (16-slot steps)."""
    caps = [50 * 16, 7 * 16, 19 * 16]
    longest = lambda counts: max(math.ceil(c / 16 / n) for c, n in zip(caps, counts, strict=True))  # noqa: E731
    got = {}
    for programs in range(3, 15):
        counts = balanced_counts(caps, programs, 16)
        best = min(longest(c) for c in itertools.product(range(1, 15), repeat=3) if sum(c) == programs)
        assert sum(counts) == programs and longest(counts) == best
        got[programs] = longest(counts)
    assert (got[3], got[9], got[12], got[14]) == (50, 10, 7, 7)
    assert balanced_counts([16, 32], 10, 16) == [1, 2]  # no program without a step to read


def test_the_mma_table_is_one_wave_where_ceiling_tiles_spill_into_a_second():
    """Batch 8 / 32k / 0.3 on 132 SMs at 8 programs an SM: tiles of one length give 1,064 programs
    (8 wait for a second wave: the mma kernel ran 1.27x bf16 there, 1.68x at 7 an SM), the
    balanced table 1,056, and its longest program reads 20 chunks (the ceiling tiles' 38 steps)."""
    tile = tile_length(LLAMA_8_AT_32K, 8, 16, 132, per_sm=8)
    assert tiled(LLAMA_8_AT_32K, tile, "cpu").tensors[0].numel() * 8 == 1064 > 8 * 132
    table = balanced_table(LLAMA_8_AT_32K, 8, 32, sms=132, per_sm=8, device="cpu", min_steps=MMA_MIN_CHUNKS)
    counts = [b - a for a, b in itertools.pairwise(table.tensors[2].tolist())]
    assert sum(counts) * 8 == 8 * 132
    chunks = [math.ceil(c / 32) for c in LLAMA_8_AT_32K]
    assert max(math.ceil(c / n) for c, n in zip(chunks, counts, strict=True)) == 20
    assert table.tile == 20 * 32 and table.most == 37


def test_one_sequence_gets_fewer_longer_programs():
    """Batch 1: 1,056 programs would read 5 steps each and leave the merge 347 partials of the
    longest head; each program reads at least MMA_MIN_CHUNKS chunks instead."""
    table = balanced_table(LLAMA_8_AT_32K, 1, 32, sms=132, per_sm=8, device="cpu", min_steps=MMA_MIN_CHUNKS)
    chunks = sum(math.ceil(c / 32) for c in LLAMA_8_AT_32K)
    assert table.tensors[0].numel() == math.ceil(chunks / MMA_MIN_CHUNKS) == 308


def test_merge_launch_reads_a_heads_partials_in_one_block():
    assert merge_launch((64, (torch.zeros(1),) * 3)) == (32, 1)  # a plain pair: the old launch
    for most, want in (
        (1, (32, 1)),
        (32, (32, 1)),
        (33, (64, 2)),
        (37, (64, 2)),
        (128, (128, 4)),
        (347, (128, 4)),
    ):
        assert merge_launch(SplitTable(64, (), most)) == want
    # an explicit merge block gets the same 32 tiles a warp (packed_decode_attention's default)
    assert [merge_warps(block) for block in (8, 32, 64, 128, 256)] == [1, 1, 2, 4, 8]


def test_split_table_follows_the_kernel_and_the_rows():
    """The mma kernel's table is balanced while a row has room for two programs a head (batch 8
    or 64 on 132 SMs); an engine's pool of 466 rows (most idle) keeps tiles of one length, as the
    Triton kernel's table does."""
    for rows in (8, 64):
        mma = split_table(LLAMA_8_AT_32K, rows, "cpu", mma=True, sms=132)
        want = balanced_table(LLAMA_8_AT_32K, rows, 32, 132, 8, "cpu", min_steps=MMA_MIN_CHUNKS)
        assert mma.tile == want.tile and all(
            torch.equal(a, b) for a, b in zip(mma.tensors, want.tensors, strict=True)
        )
        assert mma.tensors[0].numel() == 8 * 132 // rows  # 132 or 16 programs a row
    pool = split_table(LLAMA_8_AT_32K, 466, "cpu", mma=True, sms=132)
    assert pool.tile == tile_length(LLAMA_8_AT_32K, 466, 32, 132, per_sm=8) and pool.tile % 32 == 0
    assert pool.tensors[0].numel() == sum(math.ceil(c / pool.tile) for c in LLAMA_8_AT_32K) > HKV
    triton = split_table(LLAMA_8_AT_32K, 8, "cpu", mma=False, sms=132)
    assert triton.tile == tile_length(LLAMA_8_AT_32K, 8, 64, 132) and triton.tile % 64 == 0
    assert triton.most == max(math.ceil(c / triton.tile) for c in LLAMA_8_AT_32K)
