"""How often PyTorch's CUDA caching allocator went to the driver while an engine served.

``cudaMalloc`` and ``cudaFree`` synchronise the device and take milliseconds. A caching allocator
that has to grow (a new segment) or, after a failed allocation, release its cache and retry, does
so in the middle of a prefill, where a host-bound step pays it in full. The engine's reports
(``serving/engine_loop.py``) and ``baklava-bench engine`` give these counts per window / run, so
a slow served prefill can be told from one that waited on the allocator.
"""

from __future__ import annotations

import torch


def allocator_counts(device) -> dict[str, int]:
    """Cumulative ``{segments_allocated, segments_freed, alloc_retries}`` of ``device``'s caching
    allocator; empty off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats(device)
    return {
        "segments_allocated": int(stats.get("segment.all.allocated", 0)),
        "segments_freed": int(stats.get("segment.all.freed", 0)),
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
    }


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What happened between two :func:`allocator_counts`."""
    return {key: after[key] - before.get(key, 0) for key in after}
