"""The engine's decode step: one token for rows ``0 .. n-1`` of a slot pool, eager or as CUDA graphs.

The step reads a token and a position per row from static buffers, runs the model over the pool's
step view of ``n`` rows (only rows set in ``pool.step_rows`` are written) and leaves the last
logits ``[n, V]`` behind. On a CUDA device it is captured once per *bucket* (``n`` in 1, 2, 4, ...
up to the pool's rows, the smallest bucket covering the highest active row runs), every bucket's
graph sharing one memory pool; each layer's cache update runs on a second stream inside the graph
(:class:`~baklava.runtime.triton_decode.UpdateStream`). Capturing writes nothing: every row is
masked out while the graphs are recorded, so it can happen with requests in flight.
"""

from __future__ import annotations

import torch

from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.slot_pool import SlotPool


def buckets(rows: int) -> list[int]:
    """Step sizes captured for a pool of ``rows``: powers of two below it, and ``rows`` itself."""
    out, n = [], 1
    while n < rows:
        out.append(n)
        n *= 2
    return [*out, rows]


class DecodeStep:
    """``logits [n, V] = model(tokens[:n], positions[:n])`` over ``pool``'s first ``n`` rows.

    Parameters
    ----------
    model
        A transformers decoder switched to the ``baklava`` attention.
    pool : SlotPool
        The cache rows.
    cuda_graphs : bool
        Capture one graph per bucket (CUDA only); otherwise every step runs eagerly.
    """

    def __init__(self, model, pool: SlotPool, *, cuda_graphs: bool = True):
        self.model, self.pool = model, pool
        dev = pool.device
        self.tokens = torch.zeros(pool.rows, 1, dtype=torch.long, device=dev)  # [rows, 1] fed tokens
        self.position = torch.zeros(pool.rows, 1, dtype=torch.long, device=dev)  # [rows, 1]
        self.buckets = buckets(pool.rows)
        self.graphed = cuda_graphs and dev.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def bucket(self, rows_needed: int) -> int:
        """The smallest bucket covering rows ``0 .. rows_needed-1``."""
        return next(b for b in self.buckets if b >= rows_needed)

    @torch.inference_mode()
    def __call__(self, n: int, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [n]`` (rows not in ``pool.step_rows`` are ignored); returns logits ``[n, V]``."""
        self.tokens[:n, 0].copy_(tokens, non_blocking=True)
        if not self.graphed:
            return self._forward(n, None)
        if n not in self._graphs:
            self.capture(n)
        graph, logits = self._graphs[n]
        graph.replay()
        return logits

    def _forward(self, n: int, updates) -> torch.Tensor:
        view = self.pool.step_view(n)
        self.position[:n, 0].copy_(self.pool.positions()[:n])
        for layer in view.layers:
            layer.update_stream = updates
        try:
            out = self.model(
                input_ids=self.tokens[:n], position_ids=self.position[:n], **forward_cache(self.model, view)
            ).logits[:, -1]  # [n, V]
            if updates is not None:
                updates.join()
        finally:
            for layer in view.layers:
                layer.update_stream = None
        return out

    @torch.inference_mode()
    def capture(self, n: int) -> None:
        """Record the step over ``n`` rows (a warm-up run on a side stream first). No row is
        written: ``step_rows`` is cleared while recording and restored after."""
        from baklava.runtime.triton_decode import UpdateStream

        saved = self.pool.step_rows.clone()
        self.pool.step_rows.zero_()
        updates = UpdateStream(self.pool.device)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy allocations and kernel compilation happen here
                self._forward(n, updates)
            torch.cuda.current_stream().wait_stream(side)
            if self._mempool is None:
                self._mempool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                logits = self._forward(n, updates)
            self._graphs[n] = (graph, logits)
        finally:
            self.pool.step_rows.copy_(saved)

    def capture_all(self) -> None:
        """Record every bucket, largest first (so smaller ones reuse its memory)."""
        if self.graphed:
            for n in reversed(self.buckets):
                if n not in self._graphs:
                    self.capture(n)
