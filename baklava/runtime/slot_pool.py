"""One packed cache whose batch rows are sequence slots: the memory a batching engine serves from.

The pool is a :class:`~baklava.runtime.packed_cache.BudgetedCache` of ``rows`` sequences, every
row holding exactly ``sum(cap)`` slots a layer (the budget), allocated once. Requests borrow a
row (the engine may move a request to another row, exchanging what the two hold, so that
decoding rows stay at the front: :meth:`SlotPool.swap_rows`); the engine works on it through
*views* (caches whose tensors are slices of the pool's, so they write the pool in place)::

    pool.cache   keys [rows, sum(cap), D] ...      one allocation, never resized
    row_view(r)  keys[r : r + 1]                   a request's prefill chunks
    step_view(n) keys[:n]                          one decode step for rows 0 .. n-1
    step_rows    [rows] bool                       which of them the step writes
    swap_rows    rows a[i] <-> b[i]                everything two rows hold, exchanged bit for bit

A decode step runs over the first ``n`` rows (a CUDA-graph bucket) but writes only the rows whose
``step_rows`` entry is set: free rows and rows still prefilling are left unchanged (the decode
kernels' ``valid`` flag, the same one that skips left padding), and the kernels read none of their
slots (``triton_decode.attended_fill``), so a step's attention costs the rows it decodes. The
decode kernels tile every view as they tile the whole pool (``tile_rows``) and share one set of
scratch buffers, so a row's attention is summed in the same order whichever rows run beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from baklava import kv_format as formats
from baklava.errors import BaklavaError
from baklava.eviction import EvictionConfig
from baklava.runtime.packed_cache import BudgetedCache, BudgetedLayer


def bytes_per_sequence(capacities, head_dim: int, dtype: torch.dtype, kv_format=None) -> int:
    """KV bytes one sequence holds: ``sum(cap) x 2 (K and V) x`` the bytes of one vector: ``head_dim
    x dtype bytes``, or a quantized format's payload plus scales (:mod:`baklava.kv_format`)."""
    fmt, dtype_bytes = formats.parse(kv_format), torch.empty(0, dtype=dtype).element_size()
    # a full-precision format stores the model's dtype, whatever its spelling
    vector = fmt.vector_bytes(head_dim) if fmt.quantized else head_dim * dtype_bytes
    return int(np.asarray(capacities).sum()) * 2 * vector


def pool_rows(
    kv_memory: int | None,
    max_batch: int | None,
    capacities,
    head_dim: int,
    dtype: torch.dtype,
    kv_format=None,
) -> int:
    """A pool's rows: ``max_batch``, or as many as fit in ``kv_memory`` bytes, or the smaller of
    the two when both are given."""
    if kv_memory is None and max_batch is None:
        raise BaklavaError("size the engine's pool with kv_memory or max_batch")
    fits = None if kv_memory is None else rows_for_memory(kv_memory, capacities, head_dim, dtype, kv_format)
    return min(r for r in (max_batch, fits) if r is not None)


def rows_for_memory(kv_memory: int, capacities, head_dim: int, dtype: torch.dtype, kv_format=None) -> int:
    """How many sequences' caches fit in ``kv_memory`` bytes (at least one, or an error)."""
    per = bytes_per_sequence(capacities, head_dim, dtype, kv_format)
    rows = kv_memory // per
    if rows < 1:
        raise BaklavaError(
            f"KV memory of {kv_memory / 2**20:.1f} MiB holds no sequence: one needs {per / 2**20:.1f} MiB "
            "at this budget; raise --kv-memory or lower the budget"
        )
    return int(rows)


def _view(layer: BudgetedLayer, start: int, stop: int) -> BudgetedLayer:
    """A layer whose state tensors are rows ``start:stop`` of ``layer``'s (no copy)."""
    view = BudgetedLayer(layer.capacities, layer.eviction, layer.kv_format)
    view.take_storage_options(layer)
    for name in layer.state_names:
        setattr(view, name, getattr(layer, name)[start:stop])
    view.batch_size, view.num_heads, view.head_dim = stop - start, layer.num_heads, layer.head_dim
    view.value_dim = layer.value_dim
    view.dtype, view.device = layer.dtype, layer.device
    view.seen = 0  # a prefill through a view needs seen >= fill: rows are emptied first (reset_row)
    view._slot_map = None
    # the pool layer's head tables, built once: each admission's fresh view would build its own
    view._device_offsets, view._device_capacities = layer.device_offsets, layer.device_capacities
    view.step_rows = torch.ones(stop - start, dtype=torch.bool, device=layer.device)
    view.tile_rows = layer.batch_size
    view.is_initialized = True
    return view


class SlotPool:
    """``rows`` sequence slots of one packed cache with per-head ``capacities [L, H_kv]``.

    Parameters
    ----------
    capacities : array-like
        ``[L, H_kv]`` token capacities (a budget profile's).
    eviction : EvictionConfig
        Sink, window and policy of every head.
    rows : int
        Sequences served at once.
    head_dim, q_heads : int
        The model's head dimension and query heads (for the decode kernels' scratch buffers).
    dtype, device
        The model's (the keys and values when ``kv_format`` is full precision).
    kv_format
        How slots store tokens (:mod:`baklava.kv_format`): int8 / fp8 / int4 rows hold payload
        plus scales, so a row costs :func:`bytes_per_sequence` of that format.
    """

    def __init__(
        self,
        capacities,
        eviction: EvictionConfig | None,
        rows: int,
        *,
        head_dim: int,
        q_heads: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_format=None,
    ):
        if rows < 1:
            raise BaklavaError(f"a slot pool needs at least one row, got {rows}")
        self.cache = BudgetedCache(capacities, eviction, kv_format)
        self.rows = rows
        self.device = torch.device(device)
        kv_heads = self.cache.capacities.shape[1]
        self.group = q_heads // kv_heads
        empty = torch.empty(rows, kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        for layer in self.cache.layers:
            layer.lazy_initialization(empty, empty)  # [rows, sum(cap), D] each, allocated here
        self.step_rows = torch.zeros(rows, dtype=torch.bool, device=self.device)  # [rows]
        self._step_views: dict[int, BudgetedCache] = {}
        self._kernel_states = None

    @classmethod
    def for_model(cls, model, capacities, eviction, rows: int, kv_format=None) -> SlotPool:
        """A pool for ``model``'s head shape, dtype and device."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        param = next(model.parameters())
        return cls(
            capacities,
            eviction,
            rows,
            head_dim=head_dim,
            q_heads=cfg.num_attention_heads,
            dtype=param.dtype,
            device=param.device,
            kv_format=kv_format,
        )

    # ------------------------------------------------------------------ sizes
    def kv_bytes(self) -> int:
        """Bytes of the pool's keys and values (measured from the tensors)."""
        return self.cache.kv_bytes()

    # ------------------------------------------------------------------ rows
    def reset_row(self, row: int) -> None:
        """Empty row ``row`` for a new sequence: no token, score or position of the last one stays."""
        self._check(row)
        for layer in self.cache.layers:
            for name in layer.slot_names:
                getattr(layer, name)[row].zero_()
            layer.positions[row].fill_(-1)
            layer.scores[row].zero_()
            layer.fill[row].zero_()
            layer.valid_seen[row].zero_()
        self.step_rows[row] = False

    def load_row(self, row: int, cache: BudgetedCache) -> None:
        """Put a batch-1 ``cache`` of the pool's capacities (e.g. a compressed context) into row
        ``row``: its slots, positions, scores and fills, copied on the device."""
        self._check(row)
        if not np.array_equal(cache.capacities, self.cache.capacities):
            raise BaklavaError("a cache loaded into a pool row needs the pool's capacities")
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            if theirs.batch_size != 1:
                raise BaklavaError(f"load_row takes one sequence, got a batch of {theirs.batch_size}")
            if theirs.slot_names != mine.slot_names:
                raise BaklavaError("a cache loaded into a pool row needs the pool's KV format")
            for name in mine.state_names:
                getattr(mine, name)[row].copy_(getattr(theirs, name)[0])

    def swap_rows(self, a: Sequence[int], b: Sequence[int]) -> None:
        """Rows ``a[i]`` and ``b[i]`` exchange everything they hold (slots, positions, scores,
        fills, smoothing state, ``step_rows``), bit for bit: two launches a state tensor, however
        many rows move (the engine's compaction, :meth:`Engine._compact`). Views of a moved row
        keep pointing at the old row: build the moved request's view again (:meth:`moved_view`)."""
        if len(a) != len(b) or len(set(a) | set(b)) != 2 * len(a):
            raise ValueError(f"swap_rows takes two lists of distinct rows, got {a} and {b}")
        for row in (*a, *b):
            self._check(row)
        if not a:
            return
        dst = torch.tensor([*a, *b], device=self.device)
        src = torch.tensor([*b, *a], device=self.device)
        for layer in self.cache.layers:
            for name in layer.state_names:
                t = getattr(layer, name)
                t.index_copy_(0, dst, t.index_select(0, src))
        self.step_rows.index_copy_(0, dst, self.step_rows.index_select(0, src))

    def moved_view(self, view: BudgetedCache, row: int) -> BudgetedCache:
        """:meth:`row_view` of ``row`` for a request whose row moved there mid-prefill: the tokens
        its layers have seen carry over."""
        moved = self.row_view(row)
        for new, old in zip(moved.layers, view.layers, strict=True):
            new.seen = old.seen
        return moved

    def row_view(self, row: int) -> BudgetedCache:
        """A batch-1 cache writing row ``row`` in place (for a request's prefill chunks)."""
        self._check(row)
        return self._views(row, row + 1)

    def step_view(self, n: int) -> BudgetedCache:
        """The cache of rows ``0 .. n-1`` for one decode step, writing only where ``step_rows`` is set.

        Views are kept (one per ``n``): a CUDA graph captured over one replays on its tensors.
        """
        if not 1 <= n <= self.rows:
            raise ValueError(f"step over {n} rows of a pool of {self.rows}")
        if n not in self._step_views:
            view = self._views(0, n)
            for layer, state in zip(view.layers, self._states(), strict=True):
                layer.step_rows = self.step_rows[:n]
                if state is not None:
                    layer._triton_state = state.rows(n)
            self._step_views[n] = view
        return self._step_views[n]

    def positions(self) -> torch.Tensor:
        """``[rows]`` next position of every row (its count of cached tokens so far)."""
        return self.cache.layers[0].valid_seen

    def _views(self, start: int, stop: int) -> BudgetedCache:
        view = BudgetedCache(self.cache.capacities, self.cache.eviction, self.cache.kv_format)
        view.layers = [_view(layer, start, stop) for layer in self.cache.layers]
        return view

    def _states(self) -> Sequence:
        """The decode kernels' launch state for the whole pool, one per layer (None off the kernels)."""
        if self._kernel_states is None:
            from baklava.runtime.triton_decode import _LayerState

            layers = self.cache.layers
            use = layers[0]._use_kernels()
            self._kernel_states = [_LayerState(layer, self.group) if use else None for layer in layers]
        return self._kernel_states

    def _check(self, row: int) -> None:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} outside a pool of {self.rows}")
