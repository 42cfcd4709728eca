"""Launch-configuration sweep of the decode-attention kernel (GPU): ``python -m baklava.bench.kernel_sweep``.

For each case of :mod:`baklava.bench.kernel_speed`, every combination of programs per SM (tile
length), block length, warps and pipeline stages is timed as there (CUDA-graph replays) and
printed as its bandwidth ratio to SDPA on a dense cache of the same bytes, best first. This is
how the defaults of :func:`~baklava.kernels.decode_attention.tile_length` and the
stage count were chosen.
"""

from __future__ import annotations

import functools
import itertools
import json

import torch

from baklava.bench.kernel_speed import CASES, _best_sdpa, _time, packed_case
from baklava.kernels.decode_attention import packed_decode_attention, tile_length, tile_table

GRID = {"per_sm": (2, 4, 8, 16), "block_n": (32, 64, 128), "warps": (4, 8), "stages": (2, 3)}


def sweep(batch: int, context: int, budget: float) -> list[tuple[str, float]]:
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = packed_case(batch, context, budget, dev)
    caps = case.caps
    t_dense, _ = _best_sdpa(case.query[:, :, None], *case.dense_same())
    ratios = []
    for per_sm, block_n, warps, stages in itertools.product(*GRID.values()):
        tile = tile_length(caps, batch, block_n, sms, per_sm)
        table = (tile, tile_table(caps, tile, dev))
        call = functools.partial(
            packed_decode_attention,
            *case.args(),
            table=table,
            block_n=block_n,
            num_warps=warps,
            num_stages=stages,
        )
        t = _time(call, iters=30)
        ratios.append(
            (f"per_sm={per_sm} block_n={block_n} warps={warps} stages={stages}", round(t_dense / t, 3))
        )
    return sorted(ratios, key=lambda r: -r[1])


def main() -> None:
    for case in CASES:
        print(json.dumps({"case": case, "best": sweep(*case)[:5]}), flush=True)


if __name__ == "__main__":
    main()
