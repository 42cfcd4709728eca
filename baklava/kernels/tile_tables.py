"""Tile tables of the decode-attention split pass: which program reads which slots of which head.

A table is ``(tile, (tile_head [T], tile_start [T], tile_first [H + 1]))``, built once per layer
and batch size on the host and read by every step's split launch (grid ``(B, T)``): program ``t``
of a row reads head ``tile_head[t]``'s slots ``tile_start[t] .. tile_start[t] + tile`` (the Triton
kernel and the cache update's score pass), or, for the mma kernel's interleaved programs, the
head's steps ``j, j + c, ...`` where ``j = t - tile_first[h]`` and ``c`` is the head's tile count.

Two ways to cut a layer (capacities differ per head):

* :func:`tile_table` at :func:`tile_length`: tiles of one length, about ``per_sm`` programs an SM.
* :func:`balanced_table`: the mma kernel's one-warp programs, exactly as many as an SM holds at
  once, spread over the heads so that no program reads more steps than it must. With
  ``ceil(cap / tile)`` tiles a head the longest program reads up to 2x the shortest, and a tile
  count a little over what the SMs hold leaves a second wave of a few programs (the mma kernel
  ran 1.27x bf16 instead of 1.68x at 8 programs an SM for that reason; BENCHMARKS.md).
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import torch


class SplitTable(NamedTuple):
    """A layer's split-pass table: ``tile`` slots a tile, the device tensors ``(tile_head,
    tile_start, tile_first)`` and ``most``, the tiles of the head with the most (what one merge
    program reads: :func:`merge_launch`). A plain ``(tile, tensors)`` pair is read the same way."""

    tile: int
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    most: int


def split_programs_per_sm(batch: int, mma: bool) -> int:
    """Programs an SM the split pass's table aims at: the Triton kernel's four-warp programs
    (2 up to batch 2, 4 up to 16, 8 above), or the mma kernel's one-warp programs
    (:data:`MMA_PROGRAMS_PER_SM`)."""
    if mma:
        return MMA_PROGRAMS_PER_SM
    return 2 if batch <= 2 else 4 if batch <= 16 else 8


# One-warp programs of the mma kernel an SM holds at once: its ~190-224 registers a thread let two
# warps share each of an SM's four register files (2 x 32 x 256 = 16,384 registers each).
MMA_PROGRAMS_PER_SM = 8


def multiprocessors(device) -> int:
    """SM count of a CUDA device; 4 elsewhere (the Triton interpreter runs on the CPU)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def tile_length(capacities, batch: int, block_n: int, sms: int, per_sm: int | None = None) -> int:
    """Tile length (a multiple of ``block_n``) giving about ``per_sm`` programs per SM.

    Default ``per_sm``: 2 up to batch 2, 4 up to 16, 8 above (a sweep on the H100 over 2-16
    programs per SM, tiles of 32-128 slots, 4/8 warps and 2/3 stages: longer tiles won for one
    long sequence, shorter ones once many small heads need balancing; BENCHMARKS.md).
    """
    if per_sm is None:
        per_sm = split_programs_per_sm(batch, mma=False)
    work = batch * sum(capacities)
    tile = math.ceil(work / (per_sm * sms) / block_n) * block_n
    return max(block_n, min(tile, 8192))


def _as_table(tile: int, counts, device) -> SplitTable:
    """The table with ``counts[h]`` tiles of ``tile`` slots for head ``h``."""
    heads, starts, first = [], [], [0]
    for h, n in enumerate(counts):
        heads += [h] * n
        starts += [i * tile for i in range(n)]
        first.append(first[-1] + n)
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return SplitTable(tile, (as_t(heads), as_t(starts), as_t(first)), max(counts))


def tiled(capacities, tile: int, device) -> SplitTable:
    """Tiles of ``tile`` slots, ``ceil(cap / tile)`` a head (at least one)."""
    return _as_table(tile, [max(1, math.ceil(cap / tile)) for cap in capacities], device)


def tile_table(capacities, tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tile_head [T], tile_start [T], tile_first [H + 1])`` int32: head ``h`` owns tiles
    ``tile_first[h] .. tile_first[h + 1] - 1`` starting at slots ``tile_start`` of that head."""
    return tiled(capacities, tile, device).tensors


def balanced_counts(capacities, programs: int, block: int) -> list[int]:
    """Programs a head for ``programs`` in all (at least one a head): each added where the longest
    program reads the most ``block``-slot steps, which minimises the longest program."""
    steps = [max(1, math.ceil(cap / block)) for cap in capacities]
    counts = [1] * len(steps)
    longest = [(-s, h) for h, s in enumerate(steps)]
    heapq.heapify(longest)
    for _ in range(programs - len(steps)):
        work, h = longest[0]
        if work >= -1:  # every program already reads one step
            break
        counts[h] += 1
        heapq.heapreplace(longest, (-math.ceil(steps[h] / counts[h]), h))
    return counts


def balanced_table(
    capacities, batch: int, block: int, sms: int, per_sm: int, device, min_steps: int = 1
) -> SplitTable:
    """The table of ``per_sm x sms`` programs over the
    ``batch`` rows (one wave), spread by :func:`balanced_counts`, fewer where a program would read
    under ``min_steps`` steps (each program's partial costs the merge a read). ``tile`` is the
    longest program's slots, so the table also reads as contiguous tiles (the score pass's; a
    head's last tiles may be empty)."""
    steps = sum(max(1, math.ceil(cap / block)) for cap in capacities)
    programs = min(per_sm * sms // batch, math.ceil(steps / min_steps))
    counts = balanced_counts(capacities, max(len(capacities), programs), block)
    longest = max(math.ceil(cap / block / n) for cap, n in zip(capacities, counts, strict=True))
    return _as_table(block * max(1, longest), counts, device)


MERGE_TILES_A_WARP = 32  # partials one warp of the merge kernel reads at a time


def merge_warps(block: int) -> int:
    """Warps of a merge launch reading ``block`` tiles at a time (``MERGE_TILES_A_WARP`` a warp)."""
    return max(1, block // MERGE_TILES_A_WARP)


def merge_launch(table) -> tuple[int, int]:
    """``(merge_block, merge_warps)`` of the merge kernel for ``table``: a query head's tiles read
    in one block of up to 128 (32 a warp), not one block after another (the mma kernel's 8
    one-warp programs an SM give a long head 40+ tiles at batch 8: 1.687x -> 1.705x bf16 on an
    H100; one sequence of 32k, bf16's Triton kernel 7% faster; BENCHMARKS.md). A plain
    ``(tile, tensors)`` pair: 32 tiles, one warp."""
    most = getattr(table, "most", MERGE_TILES_A_WARP)
    block = min(128, max(MERGE_TILES_A_WARP, 1 << (most - 1).bit_length()))
    return block, merge_warps(block)
