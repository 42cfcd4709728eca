"""One decode token of a packed layer with the Triton kernels (the GPU path of ``attend``).

Two kernels a layer, no host sync, so the step can be captured in a CUDA graph
(:mod:`baklava.runtime.cuda_graph`):

1. :func:`~baklava.kernels.decode_attention.packed_decode_attention` reads every
   live slot once (flash-decoding over a static tile table) and, for H2O, leaves each slot's
   logits and each query head's log-sum-exp behind;
2. :func:`~baklava.kernels.cache_update.packed_cache_update` adds the step's
   attention to the scores and appends, or overwrites the lowest-priority slot in place.

The kept tokens are the ones :mod:`baklava.runtime.packed_decode` keeps; after an eviction
their slot order within a head differs (no shift), which attention does not see.

Nothing later in the step reads what the update writes (the layer's own slots, scores and fill,
read again by its next step's attention), so with an :class:`UpdateStream` the update of every
layer runs on a second stream, beside the o projection, the MLP and the next layers; the step
joins it once at its end (:class:`~baklava.runtime.cuda_graph.DecodeGraph` does).
"""

from __future__ import annotations

import contextlib
import copy
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
        from baklava.kernels.decode_attention import split_kernel, split_table
        from baklava.runtime import kv_slots

        dev, batch = layer.device, layer.batch_size
        i32 = dict(dtype=torch.int32, device=dev)
        self.key = (batch, group)
        self.capacities = torch.tensor(layer.capacities, **i32)
        self.offsets = torch.tensor(layer.offsets, **i32)
        # A slot pool's views tile as the whole pool does (`tile_rows`) and run the kernel chosen
        # for it, so a row's attention is summed in the same order whichever rows run beside it
        # (a step over one row of a pool once ran the Triton kernel, over more the mma one).
        # The split pass's kernel sets the table (`split_table`: the mma kernel's one-warp programs
        # balanced in one wave of 8 an SM while the rows leave room; the cache update's score pass
        # reads the same table as contiguous tiles).
        rows = layer.tile_rows or batch
        self.kernel = "triton"
        if kv_slots.packs(layer):
            keys, values, fmt = kv_slots.kernel_operands(layer)
            self.kernel = split_kernel(fmt, layer.head_dim, group, keys, values, rows)
        self.table = split_table(layer.capacities, rows, dev, self.kernel == "mma")
        self.logits = self.lse = self.logit_new = None
        if layer.eviction.policy == "h2o":
            f32 = dict(dtype=torch.float32, device=dev)
            self.logits = torch.empty(batch, layer.total, group, **f32)
            self.lse = torch.empty(batch, layer.num_heads * group, **f32)
            self.logit_new = torch.empty(batch, layer.num_heads * group, **f32)

    def rows(self, stop: int) -> _LayerState:
        """This state for the first ``stop`` rows: same tile table, scratch buffers as views."""
        view = copy.copy(self)
        view.key = (stop, self.key[1])
        for name in ("logits", "lse", "logit_new"):
            buf = getattr(self, name)
            setattr(view, name, None if buf is None else buf[:stop])
        return view


class UpdateStream:
    """A second CUDA stream for the layers' cache updates (set as ``BudgetedLayer.update_stream``).

    Each layer's update waits for that layer's attention, then runs while the main stream goes on
    with the rest of the step; :meth:`join` makes the main stream wait for every update launched
    so far. Whoever installs it must join before anything reads the cache again (the next step,
    the host, the end of a CUDA-graph capture).
    """

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device)
        self.forked = False  # work launched since the last join (joining none breaks a capture)

    @contextlib.contextmanager
    def fork(self, *inputs: torch.Tensor):
        """Launch the block's kernels on the update stream after what the main stream has queued;
        ``inputs`` (made on the main stream) stay allocated until the update stream is done."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        for tensor in inputs:
            tensor.record_stream(self.stream)
        self.forked = True

    def join(self) -> None:
        if self.forked:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.forked = False


def attended_fill(fill: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``fill [B, H_kv]`` with the rows the step does not write (``valid [B]`` False) emptied: the
    attention kernels read no slot of them. A slot pool's free rows and rows still prefilling then
    cost a step no bandwidth, so a step's time follows the rows it decodes, not the pool's rows."""
    return fill * valid[:, None]  # int32: bool / int8 promote to the fill's dtype


def decode_step(layer, query, k_new, v_new, slots, valid, scaling: float) -> torch.Tensor:
    """Attend and commit one token per row with the kernels; returns ``[B, H_q, 1, D]``.

    Same arguments as :func:`baklava.runtime.packed_decode.decode_step` (the layer's
    ``valid_seen`` is advanced here too). Quantized slots are read as payload + scales and the
    step's token is written as ``slots`` holds it (quantized once, by ``BudgetedLayer.update``).
    A row with ``valid`` False (padding, or a pool row the step does not decode) attends to
    the step's token alone, reading none of its slots (:func:`attended_fill`); its cache row is
    left unchanged. With ``layer.update_stream`` set, the commit runs on that stream and is only
    queued when this returns.
    """
    from baklava.kernels.cache_update import packed_cache_update
    from baklava.kernels.decode_attention import packed_decode_attention
    from baklava.runtime import kv_slots

    group = query.shape[1] // layer.num_heads
    state = getattr(layer, "_triton_state", None)
    if state is None or state.key != (layer.batch_size, group):
        state = layer._triton_state = _LayerState(layer, group)
    q, kn, vn = query[:, :, 0], k_new[:, :, 0], v_new[:, :, 0]  # [B, H, D], last dim contiguous
    keys, values, kv_format = kv_slots.kernel_operands(layer)
    out = packed_decode_attention(
        q, kn, vn, keys, values, attended_fill(layer.fill, valid), state.offsets, layer.capacities, scaling,
        table=state.table, logits=state.logits, lse=state.lse, logit_new=state.logit_new,
        kv_format=kv_format, key_scales=layer.key_scales, value_scales=layer.value_scales, kernel=state.kernel,
    )  # fmt: skip
    new = {name: t[:, :, 0] for name, t in slots.items()}  # [B, H, width] as stored
    ev = layer.eviction
    side = layer.update_stream
    with side.fork(*new.values(), valid) if side is not None else contextlib.nullcontext():
        packed_cache_update(
            layer.keys, layer.values, layer.positions, layer.scores, layer.fill, layer.valid_seen, valid,
            new["keys"], new["values"], state.capacities, state.offsets,
            sink=ev.sink, window=ev.window, policy=ev.policy,
            logits=state.logits, lse=state.lse, logit_new=state.logit_new, table=state.table,
            key_scales=layer.key_scales, value_scales=layer.value_scales,
            key_scales_new=new.get("key_scales"), value_scales_new=new.get("value_scales"),
        )  # fmt: skip
        layer.valid_seen += valid
    return out[:, :, None]
