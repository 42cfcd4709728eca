"""One decode token of a packed layer with the Triton kernels (the GPU path of ``attend``).

Two kernels a layer, no host sync, so the step can be captured in a CUDA graph
(:mod:`baklava.runtime.cuda_graph`):

1. :func:`~baklava.trt_plugins.triton_decode_attention.packed_decode_attention` reads every
   live slot once (flash-decoding over a static tile table) and, for H2O, leaves each slot's
   logits and each query head's log-sum-exp behind;
2. :func:`~baklava.trt_plugins.triton_cache_update.packed_cache_update` adds the step's
   attention to the scores and appends, or overwrites the lowest-priority slot in place.

The kept tokens are the ones :mod:`baklava.runtime.packed_decode` keeps; after an eviction
their slot order within a head differs (no shift), which attention does not see.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    """True where Triton imports (the kernels themselves need a CUDA device or TRITON_INTERPRET)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(head_dim: int) -> bool:
    """The kernels take head dims that are powers of two from 16 (``tl.dot``) to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


class _LayerState:
    """Static launch data of one layer and batch: device copies of capacities and offsets, the
    tile table, and the H2O scratch buffers (allocated once, so CUDA-graph replays reuse them)."""

    def __init__(self, layer, group: int):
        from baklava.trt_plugins.triton_decode_attention import multiprocessors, tile_length, tile_table

        dev, batch = layer.device, layer.batch_size
        i32 = dict(dtype=torch.int32, device=dev)
        self.key = (batch, group)
        self.capacities = torch.tensor(layer.capacities, **i32)
        self.offsets = torch.tensor(layer.offsets, **i32)
        tile = tile_length(layer.capacities, batch, 64, multiprocessors(dev))
        self.table = (tile, tile_table(layer.capacities, tile, dev))
        self.logits = self.lse = self.logit_new = None
        if layer.eviction.policy == "h2o":
            f32 = dict(dtype=torch.float32, device=dev)
            self.logits = torch.empty(batch, layer.total, group, **f32)
            self.lse = torch.empty(batch, layer.num_heads * group, **f32)
            self.logit_new = torch.empty(batch, layer.num_heads * group, **f32)


def decode_step(layer, query, k_new, v_new, valid, scaling: float) -> torch.Tensor:
    """Attend and commit one token per row with the kernels; returns ``[B, H_q, 1, D]``.

    Same arguments as :func:`baklava.runtime.packed_decode.decode_step`. The output of a padding
    row (``valid`` False) is unspecified; its cache row is left unchanged.
    """
    from baklava.trt_plugins.triton_cache_update import packed_cache_update
    from baklava.trt_plugins.triton_decode_attention import packed_decode_attention

    group = query.shape[1] // layer.num_heads
    state = getattr(layer, "_triton_state", None)
    if state is None or state.key != (layer.batch_size, group):
        state = layer._triton_state = _LayerState(layer, group)
    q, kn, vn = query[:, :, 0], k_new[:, :, 0], v_new[:, :, 0]  # [B, H, D], last dim contiguous
    out = packed_decode_attention(
        q, kn, vn, layer.keys, layer.values, layer.fill, state.offsets, layer.capacities, scaling,
        table=state.table, logits=state.logits, lse=state.lse, logit_new=state.logit_new,
    )  # fmt: skip
    ev = layer.eviction
    packed_cache_update(
        layer.keys, layer.values, layer.positions, layer.scores, layer.fill, layer.valid_seen, valid,
        kn, vn, state.capacities, state.offsets,
        sink=ev.sink, window=ev.window, policy=ev.policy,
        logits=state.logits, lse=state.lse, logit_new=state.logit_new, table=state.table,
    )  # fmt: skip
    return out[:, :, None]
