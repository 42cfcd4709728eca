"""Decode-attention kernel speed on the GPU: packed per-head cache vs PyTorch SDPA, one run.

One layer of Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16). For each
(batch, context, budget) it times, with CUDA events (median of ``iters``):

* ``packed``: the Triton kernel over a packed cache with BaKlaVa-like uneven capacities summing
  to ``budget * context`` per head on average, every head full;
* ``sdpa_full``: the best SDPA backend over the full dense cache (``context`` per head);
* ``sdpa_dense_same``: SDPA over a dense cache cut uniformly to the same bytes as ``packed``;
* ``copy``: a device-to-device copy of the packed cache's bytes (read + write), for scale.

Every call is captured in a CUDA graph and replayed (as the decode step runs), so launch overhead
is excluded for all of them. Bandwidth = bytes of K and V read / time. ``packed`` and
``sdpa_dense_same`` (the 90% target's pair) are timed alternately ``rounds`` times (SDPA with the
backend that won the first try): a drift of the shared machine then hits both alike, and the
reported ratio is the median of the rounds' ratios (each round's in ``ratio_rounds``, its two
times in ``rounds_ms``). Run:
``python -m baklava.bench.kernel_speed``.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from baklava.bench.gpu_decode import median_ms
from baklava.kernels.decode_attention import packed_decode_attention, split_table

HQ, HKV, D = 32, 8, 128


def _time(fn, iters: int = 50, graph: bool = True, calls: int = 1) -> float:
    """Median seconds per call; with ``graph`` the call is captured in a CUDA graph and replayed
    (how the runtime runs a decode step), so Python launch overhead is not counted; ``calls``
    calls in the graph (a step's layers) share its launch, and the time is one call's."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for _ in range(calls):
                fn()
        fn = cuda_graph.replay
        fn()
        torch.cuda.synchronize()
    return median_ms(fn, iters) / 1e3 / (calls if graph else 1)


def _sdpa(q, k, v, backend: str) -> float:
    """Seconds per call of SDPA with one backend (by name)."""
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def _best_sdpa(q, k, v) -> tuple[float, str]:
    best = (float("inf"), "none")
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            best = min(best, (_sdpa(q, k, v, backend.name), backend.name))
        except (RuntimeError, torch.cuda.CudaError):
            continue
    return best


def uneven_caps(context: int, budget: float, heads: int, seed: int = 0) -> list[int]:
    """Capacities like a BaKlaVa allocation: log-normal spread, mean ``budget * context``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(0.6 * torch.randn(heads, generator=g))
    caps = (w / w.sum() * budget * context * heads).round().clamp(1, context).long()
    caps[0] += int(round(budget * context * heads)) - int(caps.sum())
    return caps.clamp(1, context).tolist()


class PackedCase(NamedTuple):
    """One decode step's inputs over a packed cache with uneven capacities, every head full:
    :func:`packed_decode_attention`'s arguments, in its order (:meth:`args`)."""

    query: torch.Tensor  # [B, HQ, D]
    key_new: torch.Tensor  # [B, HKV, D]
    value_new: torch.Tensor
    keys: torch.Tensor  # [B, sum(caps), D]
    values: torch.Tensor
    fill: torch.Tensor  # [B, HKV] int32, = caps
    offsets: torch.Tensor  # [HKV] int32
    caps: list[int]

    def args(self) -> tuple:
        """``(query, key_new, value_new, keys, values, fill, offsets, caps, scale)``."""
        return (*self, D**-0.5)

    def dense_same(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Random dense K and V ``[B, HKV, sum(caps) // HKV, D]``: the packed cache's bytes, cut uniformly."""
        batch, total = self.keys.shape[:2]
        like = dict(device=self.keys.device, dtype=self.keys.dtype)
        return torch.randn(batch, HKV, total // HKV, D, **like), torch.randn(
            batch, HKV, total // HKV, D, **like
        )


def packed_case(batch: int, context: int, budget: float, device="cuda", dtype=torch.bfloat16) -> PackedCase:
    """Random inputs for ``batch`` sequences, capacities :func:`uneven_caps` (Llama-3-8B head shapes)."""
    caps = uneven_caps(context, budget, HKV)
    total = sum(caps)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    fill = torch.tensor([caps] * batch, dtype=torch.int32, device=device)
    offsets = torch.tensor([sum(caps[:i]) for i in range(HKV)], dtype=torch.int32, device=device)
    return PackedCase(
        rand(batch, HQ, D), rand(batch, HKV, D), rand(batch, HKV, D), rand(batch, total, D), rand(batch, total, D),
        fill, offsets, caps,
    )  # fmt: skip


def measure(batch: int, context: int, budget: float, rounds: int = 5) -> dict:
    dev, dt = "cuda", torch.bfloat16
    case = packed_case(batch, context, budget, dev, dt)
    caps, keys, values = case.caps, case.keys, case.values
    packed_bytes = 2 * keys.numel() * keys.element_size()
    table = split_table(caps, batch, dev, mma=False)  # built once per layer, as the runtime does

    def packed():
        return packed_decode_attention(*case.args(), table=table)

    q4 = case.query[:, :, None]  # [B, HQ, 1, D]
    kf, vf = (torch.randn(batch, HKV, context, D, device=dev, dtype=dt) for _ in range(2))  # K and V distinct
    t_full, be_full = _best_sdpa(q4, kf, vf)
    full_bytes = 2 * kf.numel() * kf.element_size()
    del kf, vf
    kd, vd = case.dense_same()
    _, be_same = _best_sdpa(q4, kd, vd)
    same_bytes = 2 * kd.numel() * kd.element_size()
    times = [(_time(packed), _sdpa(q4, kd, vd, be_same)) for _ in range(rounds)]  # alternating
    del kd, vd
    ratios = [(packed_bytes / tp) / (same_bytes / ts) for tp, ts in times]
    t_packed = statistics.median(tp for tp, _ in times)
    t_same = statistics.median(ts for _, ts in times)
    dst = torch.empty_like(keys)
    t_copy = _time(lambda: (dst.copy_(keys), dst.copy_(values)))
    return {
        "batch": batch, "context": context, "budget": budget, "caps_min_max": [min(caps), max(caps)],
        "packed_ms": round(t_packed * 1e3, 4), "packed_TBps": round(packed_bytes / t_packed / 1e12, 3),
        "sdpa_dense_same_ms": round(t_same * 1e3, 4), "sdpa_dense_same_TBps": round(same_bytes / t_same / 1e12, 3),
        "sdpa_dense_same_backend": be_same,
        "sdpa_full_ms": round(t_full * 1e3, 4), "sdpa_full_TBps": round(full_bytes / t_full / 1e12, 3),
        "sdpa_full_backend": be_full,
        "copy_TBps": round(2 * packed_bytes / t_copy / 1e12, 3),
        "packed_vs_dense_same_bandwidth": round(statistics.median(ratios), 3),
        "ratio_rounds": [round(r, 3) for r in ratios],
        "rounds_ms": [[round(tp * 1e3, 4), round(ts * 1e3, 4)] for tp, ts in times],  # [packed, SDPA]
        "speedup_vs_sdpa_full": round(t_full / t_packed, 3),
    }  # fmt: skip


CASES = [(8, 32768, b) for b in (0.1, 0.3, 0.5)] + [(1, 131072, 0.3), (16, 16384, 0.3), (64, 4096, 0.3)]


def main(argv: list[str]) -> None:
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for batch, context, budget in CASES:
        print(json.dumps(measure(batch, context, budget)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
