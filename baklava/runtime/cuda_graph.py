"""Greedy decoding with the whole decode step captured in one CUDA graph.

A decode step of a small model is a few thousand tiny kernels; launched one by one from Python
it is bound by the host (~90 ms a step for SmolLM2 on an H100). The packed cache's one-token path
(:mod:`baklava.runtime.packed_decode`) updates its buffers in place and never syncs with the
host, so the step - model forward, attention over the packed slots, eviction, argmax, feeding the
token back - is captured once per cache and replayed once per token.

Decode tokens are never padding, so the step runs without an attention mask; the position of the
token fed is each row's count of real tokens (the cache's ``valid_seen``). Each layer's cache
update (the Triton path) is captured on a second stream, beside the rest of the step
(:class:`~baklava.runtime.triton_decode.UpdateStream`), and joined at the step's end.
"""

from __future__ import annotations

import torch

from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.packed_cache import BudgetedCache
from baklava.runtime.triton_decode import UpdateStream


def _snapshot(cache: BudgetedCache) -> list[dict]:
    return [
        {name: getattr(layer, name).clone() for name in layer.state_names} | {"seen": layer.seen}
        for layer in cache.layers
    ]


def _restore(cache: BudgetedCache, snapshot: list[dict]) -> None:
    for layer, saved in zip(cache.layers, snapshot, strict=True):
        for name in layer.state_names:
            getattr(layer, name).copy_(saved[name])
        layer.seen = saved["seen"]


class DecodeGraph:
    """One greedy decode step of ``model`` over ``cache``, captured once, replayed per token.

    ``first [B]`` is the token fed by the first replay (the argmax of the prompt's last logits);
    each replay writes its argmax to the next column of :attr:`tokens` and feeds it back. The
    cache must hold the prompt (every layer initialised, on a CUDA device); capturing leaves it
    as it was (a warm-up step runs on a side stream and is undone). With ``overlap_updates`` the
    layers' cache updates run on a second stream inside the graph.
    """

    @torch.inference_mode()
    def __init__(
        self, model, cache: BudgetedCache, first: torch.Tensor, steps: int, overlap_updates: bool = True
    ):
        batch = first.shape[0]
        self.cache, self.steps = cache, steps
        self.tokens = torch.zeros(batch, steps, dtype=torch.long, device=first.device)
        self.tokens[:, 0] = first
        layers = cache.layers
        token = first.view(batch, 1).clone()
        position = layers[0].valid_seen.view(batch, 1).clone()
        column = torch.ones(batch, 1, dtype=torch.long, device=first.device)
        updates = UpdateStream(first.device) if overlap_updates else None

        def step() -> None:
            logits = model(input_ids=token, position_ids=position, **forward_cache(model, cache)).logits[
                :, -1
            ]
            if updates is not None:
                updates.join()
            nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
            self.tokens.scatter_(1, column.clamp(max=steps - 1), nxt)
            token.copy_(nxt)
            position.add_(1)
            column.add_(1)

        saved = _snapshot(cache)
        for layer in layers:
            layer.update_stream = updates
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy allocations (cuBLAS workspaces, kernel
                step()  # compilation, tile tables) happen outside the capture
            torch.cuda.current_stream().wait_stream(side)
            _restore(cache, saved)
            self.tokens[:, 1:] = 0
            token.copy_(first.view(batch, 1))
            position.copy_(layers[0].valid_seen.view(batch, 1))
            column.fill_(1)

            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                step()
        finally:  # eager steps after the capture must not leave updates unjoined
            for layer in layers:
                layer.update_stream = None
        for layer, s in zip(layers, saved, strict=True):  # capturing ran the Python side (seen += 1) only
            layer.seen = s["seen"]

    def replay(self) -> None:
        """One decode step: the next token lands in :attr:`tokens`, the cache takes the fed one."""
        self.graph.replay()
        for layer in self.cache.layers:
            layer.seen += 1


def greedy_cuda_graph(model, cache: BudgetedCache, first: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens ``[B, steps]``: ``first [B]`` (argmax of the prompt's last logits), then greedy.

    ``cache`` holds the prompt (every layer initialised, on a CUDA device); it ends holding the
    prompt and the fed tokens, as after eager decoding.
    """
    if steps == 1:
        return first.view(-1, 1).clone()
    graph = DecodeGraph(model, cache, first, steps)
    for _ in range(steps - 1):
        graph.replay()
    return graph.tokens
