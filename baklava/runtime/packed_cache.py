"""The budgeted KV cache: every KV head stores its own tokens in one packed, ragged buffer.

Layout of one layer (no padding to the largest head)::

    keys   [B, sum(cap), D]     head h owns slots [off_h, off_h + cap_h)
    values [B, sum(cap), D]
    positions [B, sum(cap)] int32, scores [B, sum(cap)] float32, fill [B, H_kv] int64

so the KV bytes of a layer are exactly ``B * sum(cap) * 2 * D * dtype_bytes``. Within a head the
first ``fill[b, h]`` slots are live and kept in arrival order. A quantized ``kv_format`` stores
payload and per-slot scales instead (``key_scales``, ``value_scales``; :mod:`kv_slots`), at the
format's bytes.

One model step runs in two halves, because eviction needs the step's attention:

1. ``update(k, v)`` (called by the model's attention module) stashes the new keys/values and tags
   them for the ``baklava`` attention implementation;
2. ``attend(query, mask)`` (called by that implementation, :mod:`baklava.runtime.attention`)
   attends each query group over its head's live slots plus the new tokens, then commits the new
   tokens into the head's slots, evicting by :mod:`baklava.runtime.selection` when it is full.

It plugs into ``model.generate(cache=cache)`` (``past_key_values=`` before transformers 5.24) for
Llama / Qwen2 / Mistral models once the model uses ``attn_implementation="baklava"``
(:func:`baklava.runtime.attention.enable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from baklava import kv_format as kv_format_module
from baklava.eviction import EvictionConfig
from baklava.kernels.launch import device_table
from baklava.runtime import kv_slots, layer_compression, prefill_attention, triton_decode
from baklava.runtime.packed_decode import SlotMap, decode_step
from baklava.runtime.prefill_attention import new_token_bias, real_tokens
from baklava.runtime.selection import chronological_keep, keep_priority, snapkv_pool

_NOT_ATTENDED = (
    "BudgetedCache: a step was cached but never attended; the model must run with "
    "attn_implementation='baklava' (call baklava.enable(model) first)"
)

# the class flags of how a layer stores its tokens (each commented in BudgetedLayer), copied to
# every layer made from another (compressed, a pool's row views)
STORAGE_OPTIONS = ("quantized_storage", "smooth_keys", "balance_keys")

# a slot's token position (its count of real tokens before it): 4 bytes, not 8, since every slot
# pays it whatever the KV format (an int4 slot of D = 128 stores 140 bytes of keys and values);
# 2**31 tokens is beyond any context a cache holds
POSITION_DTYPE = torch.int32


class BudgetedLayer(CacheLayerMixin):
    """One decoder layer's packed per-head cache (the PyTorch reference)."""

    is_sliding = False
    vectorized_decode = True  # one-token steps without the loop over heads (packed_decode.py)
    # one-token steps with the Triton kernels (triton_decode.py): "auto" = on CUDA where Triton
    # imports; "triton" also elsewhere (the tests run them in TRITON_INTERPRET mode); "torch" never
    decode_kernels = "auto"
    # prefill chunks without padding through SDPA's causal kernels (prefill_attention.unpadded_chunk);
    # False: the per-head biased path every chunk (the reference the fast one is tested against)
    unpadded_prefill = True
    # unpadded prefill chunks by the GPU route (kernel_prefill.py: Triton prefill kernels, no host
    # sync; where the decode kernels run) instead of an SDPA call per KV head: on an H200, 2048-
    # token chunks of a 32k prompt at budget 0.3 take 1.42 s against SDPA's 3.27 (BENCHMARKS.md)
    prefill_kernel = True
    # a quantized kv_format stores payload + scales (kv_slots.py); False: the model's dtype, each
    # token rounded on entry (quantize -> dequantize), the reference the payload is tested against
    quantized_storage = True
    # quantized keys stored minus their head's mean key (kv_slots.py; exported graphs alike): on
    # an H200, Qwen2.5-Coder int8 at 0.3 and 32k keeps 99% of bf16's score with it, 92% without
    smooth_keys = True
    # ... and balanced per channel against the first step's queries, attention taking q / s (False:
    # centred only, s = 1; an ablation, exported graphs always balance): Qwen2.5-Coder's int4 KL
    # to float32 0.186 -> 0.036 on the CPU
    balance_keys = True
    key_scales = value_scales = None  # a quantized layer's [B, sum(cap), W] scales (kv_slots)
    key_mean = key_scale = None  # a smoothing layer's [B, H_kv, D] float32 row state (kv_slots.py)
    is_compileable = False
    is_croppable = False
    supports_early_init = True

    def __init__(self, capacities: Sequence[int], eviction: EvictionConfig | None = None, kv_format=None):
        super().__init__()
        # how a slot stores a token (kv_format.py, kv_slots.py): the model's dtype, or payload + scales
        self.kv_format = kv_format_module.parse(kv_format)
        for name in STORAGE_OPTIONS:  # fixed for the layer's life
            setattr(self, name, getattr(type(self), name))
        self.capacities = [int(c) for c in capacities]
        if not self.capacities or min(self.capacities) < 1:
            raise ValueError(f"every head needs a capacity >= 1, got {self.capacities}")
        self.offsets = [0, *np.cumsum(self.capacities)[:-1].tolist()]
        self.total = int(sum(self.capacities))
        self.eviction = eviction or EvictionConfig()
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.probe = None  # set while a ReconstructionProbe reads through this layer
        self.update_stream = None  # a triton_decode.UpdateStream while a CUDA-graph step overlaps updates
        self.tile_rows = None  # rows the decode kernels' tiles are sized for (default: the batch)
        self._device_offsets = self._device_capacities = None  # int32 on the device, for the prefill kernels

    def take_storage_options(self, other: BudgetedLayer) -> None:
        """Store tokens as ``other`` does (:data:`STORAGE_OPTIONS`)."""
        for name in STORAGE_OPTIONS:
            setattr(self, name, getattr(other, name))

    def __repr__(self) -> str:
        return f"BudgetedLayer(capacities={self.capacities}, policy={self.eviction.policy!r})"

    # ------------------------------------------------------------------ transformers interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if heads != len(self.capacities):
            raise ValueError(
                f"layer has {len(self.capacities)} KV-head capacities but the model has {heads} KV heads"
            )
        self.batch_size, self.num_heads, self.head_dim = batch, heads, head_dim
        self.value_dim = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        dev = self.device
        # keys, values [B, sum(cap), D] (+ key_scales, value_scales when quantized: kv_slots.py)
        kv_slots.allocate(self, batch, head_dim, self.value_dim, self.dtype, dev)
        # [B, sum(cap)] each
        self.positions = torch.full((batch, self.total), -1, dtype=POSITION_DTYPE, device=dev)
        self.scores = torch.zeros(batch, self.total, dtype=torch.float32, device=dev)
        self.fill = torch.zeros(batch, heads, dtype=torch.int64, device=dev)  # [B, H_kv]
        self.valid_seen = torch.zeros(batch, dtype=torch.int64, device=dev)  # [B] next position per row
        self.seen = 0  # tokens processed, padding included; >= every fill (kernel_prefill relies on it)
        self._slot_map = None  # built on first use: only the PyTorch one-token path needs it
        # [B] rows a one-token step without a mask writes: all of them, except in a slot pool,
        # whose engine clears the rows that are free or still prefilling (runtime/slot_pool.py)
        self.step_rows = torch.ones(batch, dtype=torch.bool, device=dev)
        self.is_initialized = True

    @property
    def slot_names(self) -> tuple[str, ...]:
        """The per-slot tensors that move together when a slot moves (keys, values, their scales)."""
        return kv_slots.slot_names(self)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Every per-row state tensor (what a slot pool's row or a CUDA-graph snapshot holds)."""
        return self.slot_names + kv_slots.META + kv_slots.state_extra(self)

    def stored(self, name: str, *index) -> torch.Tensor:
        """``keys`` or ``values`` ``[index]`` in the model's dtype (quantized slots dequantized)."""
        return kv_slots.read(self, name, *index)

    @property
    def device_offsets(self) -> torch.Tensor:
        """``offsets`` as an int32 tensor on the cache's device (the prefill kernels' head table),
        built once instead of copied to the device for every chunk."""
        if self._device_offsets is None:
            self._device_offsets = device_table(self.offsets, self.device)
        return self._device_offsets

    @property
    def device_capacities(self) -> torch.Tensor:
        """``capacities`` as an int32 tensor on the cache's device (built once, as ``device_offsets``)."""
        if self._device_capacities is None:
            self._device_capacities = device_table(self.capacities, self.device)
        return self._device_capacities

    @property
    def slot_map(self) -> SlotMap:
        """Owner head and rank of every slot (``[H_kv, sum(cap)]`` masks: sizeable on long caches,
        so built only when the PyTorch one-token path first runs)."""
        if self._slot_map is None:
            self._slot_map = SlotMap(self.capacities, self.device)
        return self._slot_map

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stash this step's keys/values ``[B, H_kv, q, D]`` until :meth:`attend` commits them."""
        if self._pending is not None:
            raise RuntimeError(_NOT_ATTENDED)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch_size:
            raise ValueError(f"cache was built for batch {self.batch_size}, got batch {key_states.shape[0]}")
        # encoded by `attend`: a smoothing layer's key scale needs the step's queries (kv_slots.py)
        self._pending = (key_states, value_states)
        key_states._baklava_layer = self  # read by the `baklava` attention implementation
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The model's mask covers only the new tokens; stored slots are masked by `fill`.
        return query_length, self.get_seq_length()

    def get_max_length(self) -> int:
        return -1  # eviction keeps the cache bounded, the sequence is not

    def reset(self) -> None:
        if self.is_initialized:
            for name in self.slot_names:
                getattr(self, name).zero_()
            self.positions.fill_(-1)
            self.scores.zero_()
            self.fill.zero_()
            self.valid_seen.zero_()
            self.seen = 0
        self._pending = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a budgeted cache cannot be cropped: evicted tokens are gone")

    def _index_batch(self, index: torch.Tensor) -> None:
        for name in self.state_names:
            setattr(self, name, getattr(self, name).index_select(0, index.to(self.device)))
        self.batch_size = self.keys.shape[0]
        self.step_rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._index_batch(torch.as_tensor(indices, device=self.device).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._index_batch(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    # ------------------------------------------------------------------ sizes
    def kv_bytes(self) -> int:
        """Bytes of the packed key and value buffers, scales included (what the budget promises)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name).nbytes for name in self.slot_names)

    def metadata_bytes(self) -> int:
        """Bytes of positions, scores and fill levels (eviction bookkeeping)."""
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (self.positions, self.scores, self.fill, self.valid_seen))

    def head_keys(self, h: int, b: int = 0) -> torch.Tensor:
        """Live keys ``[fill, D]`` of head ``h`` in row ``b`` (for inspection and tests)."""
        off = self.offsets[h]
        return self.stored("keys", b, slice(off, off + int(self.fill[b, h])))

    def head_positions(self, h: int, b: int = 0) -> torch.Tensor:
        off = self.offsets[h]
        return self.positions[b, off : off + int(self.fill[b, h])]

    # ------------------------------------------------------------------ compression
    def compressed(self, capacities: Sequence[int], eviction: EvictionConfig | None = None) -> BudgetedLayer:
        """A new layer with this layer's tokens cut to ``capacities`` by the eviction priority
        (:func:`baklava.runtime.layer_compression.compressed`: one full prefill, many budgets)."""
        return layer_compression.compressed(self, capacities, eviction)

    # ------------------------------------------------------------------ attention + commit
    def attend(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> tuple[torch.Tensor, None]:
        """Attention of ``query`` over the stored slots and the pending tokens, then commit.

        Parameters
        ----------
        query : torch.Tensor
            ``[B, H_q, q, D]`` (after RoPE).
        attention_mask : torch.Tensor or None
            ``[B, 1, q, q]`` additive mask of the new tokens (causal + padding), as built by
            transformers from :meth:`get_mask_sizes`; ``None`` means causal without padding.

        Returns
        -------
        tuple
            ``attn_output [B, q, H_q, D]`` and ``None`` (no attention weights).
        """
        if self._pending is None:
            raise RuntimeError("BudgetedCache.attend called without a pending update")
        # attention reads the new tokens [B, H_kv, q, D] as the cache will give them back, with the
        # query that pairs with stored keys; `slots` is what is stored
        batch, q_heads, q_len, _ = query.shape
        # with a mask (padding): the new tokens' [B, 1, q, q] bias and [B, q] real tokens, built once
        # for every path below and for a smoothing layer's statistics; without one none is built
        new_bias = real = None
        if attention_mask is not None:
            new_bias = new_token_bias(attention_mask, batch, q_len, query)
            real = real_tokens(new_bias)
        query, k_new, v_new, slots = kv_slots.encode(self, query, *self._pending, real)
        self._pending = None
        group = q_heads // self.num_heads
        if q_len == 1 and self.vectorized_decode:
            # a decode step without padding has no mask and builds none (fewer launches)
            valid = self.step_rows if real is None else real[:, 0]  # [B]
            step = triton_decode.decode_step if self._use_kernels() else decode_step
            out = step(self, query, k_new, v_new, slots, valid, scaling)  # advances valid_seen
            self.seen += 1
            return out.transpose(1, 2).contiguous(), None
        need_scores = self.eviction.policy == "h2o"
        obs = min(q_len, self.eviction.obs_window)
        kernels = self._use_kernels()
        if kernels and self.prefill_kernel and self.probe is None and self.unpadded_prefill:
            # the GPU: no host sync (kernel_prefill.py); a mask is causal + padding (baklava_mask)
            from baklava.runtime import kernel_prefill

            out = kernel_prefill.chunk(self, query, k_new, v_new, slots, scaling, obs * need_scores, real)
            return out, None
        if attention_mask is None and self.probe is None and self.unpadded_prefill:
            fast = prefill_attention.unpadded_chunk(self, query, k_new, v_new, scaling, obs * need_scores)
            if fast is not None:
                out, masses = fast
                if all(n + q_len <= cap for (n, _), cap in zip(masses, self.capacities, strict=True)):
                    prefill_attention.append_chunk(self, slots, masses)  # nothing to evict
                else:
                    valid_new = torch.ones(batch, q_len, dtype=torch.bool, device=self.device)
                    self._commit(slots, valid_new, masses, kernels)
                return out.transpose(1, 2).contiguous(), None

        if new_bias is None:  # causal, every token real
            new_bias = new_token_bias(None, batch, q_len, query)
            real = real_tokens(new_bias)
        valid_new = real  # [B, q] False for padding
        if self.probe is not None:  # reading without storing (runtime/reconstruction.py)
            return self.probe.attend(self, query, k_new, v_new, new_bias, valid_new, scaling), None

        out = query.new_empty(batch, q_heads, q_len, v_new.shape[-1])  # [B, H_q, q, D]
        masses = []
        for h in range(self.num_heads):
            n, qh, k_g, v_g, bias = prefill_attention.head_inputs(self, h, query, k_new, v_new, new_bias)
            out[:, h * group : (h + 1) * group] = prefill_attention.sdpa_in_query_blocks(
                qh, k_g, v_g, bias, scaling
            )
            mass = None
            if need_scores:  # attention the last `obs` queries pay to each candidate, [B, n + q]
                logits = (qh[:, :, -obs:].float() @ k_g.float().transpose(-1, -2)) * scaling
                probs = torch.softmax(
                    logits + bias.rows(q_len - obs, q_len).float(), dim=-1
                )  # [B, g, obs, n + q]
                q_ok = valid_new[:, -obs:].to(probs.dtype)[:, None, :, None]
                mass = (probs * q_ok).sum(2).mean(1)
            masses.append((n, mass))
        self._commit(slots, valid_new, masses, kernels)
        return out.transpose(1, 2).contiguous(), None

    def _commit(self, slots: dict, valid, masses, kernels: bool) -> None:
        """Store a prefill chunk (``slots``: each slot tensor's new rows ``[B, H_kv, q, width]``,
        ``masses``: each head's ``(n, mass)``)."""
        if kernels:  # heads are independent: all of them at once (kernels/prefill_select.py)
            from baklava.runtime import kernel_prefill

            kernel_prefill.commit_masked(self, slots, valid, masses)
        else:
            for h, (n, mass) in enumerate(masses):
                self._commit_head(h, n, {name: new[:, h] for name, new in slots.items()}, valid, mass)
        self.valid_seen += valid.sum(1)
        self.seen += valid.shape[1]

    def _use_kernels(self) -> bool:
        if self.decode_kernels == "torch":
            return False
        if self.decode_kernels == "triton":
            return True
        return (
            self.device.type == "cuda" and triton_decode.supports(self.head_dim) and triton_decode.available()
        )

    def _commit_head(self, h: int, n: int, new: dict, valid: torch.Tensor, mass: torch.Tensor | None) -> None:
        """Write head ``h``'s new tokens (``new``: each slot tensor's rows ``[B, q, width]``) into its
        slots, evicting if full."""
        cap, off = self.capacities[h], self.offsets[h]
        ev = self.eviction
        fill = self.fill[:, h]  # [B]
        batch, q_len = valid.shape
        rank = valid.cumsum(1) - 1  # [B, q] index among this row's new valid tokens
        new_pos = self.valid_seen[:, None] + rank  # [B, q]
        n_new = valid.sum(1)  # [B]
        if mass is None:
            stored_inc = torch.zeros(batch, n, device=self.device)
            new_score = torch.zeros(batch, q_len, device=self.device)
        else:
            stored_inc, new_score = mass[:, :n], mass[:, n:]
            if q_len > 1:
                new_score = snapkv_pool(new_score.masked_fill(~valid, 0), ev.pool_kernel)

        if bool((fill + n_new <= cap).all()):  # room for everything: append in arrival order
            self.scores[:, off : off + n] += stored_inc
            rows, cols = valid.nonzero(as_tuple=True)
            slots = off + fill[rows] + rank[rows, cols]
            for name, rows_new in new.items():
                getattr(self, name)[rows, slots] = rows_new[rows, cols]
            self.positions[rows, slots] = new_pos[rows, cols].to(POSITION_DTYPE)
            self.scores[rows, slots] = new_score[rows, cols]
            self.fill[:, h] = fill + n_new
            return

        live = torch.arange(n, device=self.device)[None, :] < fill[:, None]
        cand_valid = torch.cat([live, valid], dim=1)  # [B, n + q]
        cand_pos = torch.cat([self.positions[:, off : off + n], new_pos], dim=1)
        cand_score = torch.cat([self.scores[:, off : off + n] + stored_inc, new_score], dim=1)
        priority = keep_priority(
            cand_pos,
            cand_score,
            cand_valid,
            self.valid_seen + n_new,
            sink=ev.sink,
            window=ev.window,
            policy=ev.policy,
        )
        keep = min(cap, n + q_len)
        idx = chronological_keep(priority, cand_valid, keep)  # [B, keep]
        for name, rows_new in new.items():  # a slot's payload and scales move together
            buf = getattr(self, name)
            cand = torch.cat([buf[:, off : off + n], rows_new], dim=1)
            buf[:, off : off + keep] = cand.gather(1, idx[..., None].expand(-1, -1, cand.shape[-1]))
        self.positions[:, off : off + keep] = cand_pos.gather(1, idx)
        self.scores[:, off : off + keep] = cand_score.gather(1, idx)
        self.fill[:, h] = torch.clamp(cand_valid.sum(1), max=cap)


class BudgetedCache(Cache):
    """A transformers ``Cache`` of :class:`BudgetedLayer` s, one per decoder layer.

    Parameters
    ----------
    capacities : array-like
        ``[L, H_kv]`` integer token capacities.
    eviction : EvictionConfig
        Sink, window and policy shared by every head.

    Examples
    --------
    >>> cache = BudgetedCache.from_profile(profile)                     # doctest: +SKIP
    >>> model.generate(**inputs, cache=cache, max_new_tokens=32)  # doctest: +SKIP
    """

    def __init__(self, capacities, eviction: EvictionConfig | None = None, kv_format=None):
        caps = np.asarray(capacities, dtype=np.int64)
        if caps.ndim != 2:
            raise ValueError(f"capacities must be [L, H_kv], got shape {caps.shape}")
        self.capacities = caps
        self.eviction = eviction or EvictionConfig()
        self.kv_format = kv_format_module.parse(kv_format)
        super().__init__(layers=[BudgetedLayer(row.tolist(), self.eviction, self.kv_format) for row in caps])

    @classmethod
    def from_profile(cls, profile, model=None) -> BudgetedCache:
        """Cache for ``profile`` (a :class:`~baklava.profiles.profile_file.BudgetProfile`).

        With ``model``, also check the profile was made for that model and switch the model to the
        ``baklava`` attention implementation.
        """
        if model is None:
            return cls(profile.require_capacities(), profile.eviction, profile.kv_format)
        from baklava.runtime.attention import enable

        caps = profile.capacities_for(model.config)
        enable(model)
        return cls(caps, profile.eviction, profile.kv_format)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # The previous layer's step must have been attended by now; if not, the model is not
        # using the `baklava` attention and would silently attend over the new tokens only.
        if layer_idx > 0 and self.layers[layer_idx - 1]._pending is not None:
            raise RuntimeError(_NOT_ATTENDED)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def compressed(self, capacities, eviction: EvictionConfig | None = None) -> BudgetedCache:
        """A new cache holding this one's tokens cut to ``capacities [L, H_kv]``.

        See :meth:`BudgetedLayer.compressed`: from a cache that has not evicted yet, this equals
        prefilling straight into ``capacities``. This cache is left unchanged.
        """
        new = BudgetedCache(capacities, eviction or self.eviction, self.kv_format)
        if len(new.layers) != len(self.layers):
            raise ValueError(f"capacities for {len(new.layers)} layers, cache has {len(self.layers)}")
        new.layers = [
            old.compressed(row.tolist(), new.eviction)
            for old, row in zip(self.layers, new.capacities, strict=True)
        ]
        return new

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values over all layers (measured from the tensors)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def metadata_bytes(self) -> int:
        return sum(layer.metadata_bytes() for layer in self.layers)

    def fill_levels(self) -> torch.Tensor:
        """``[L, B, H_kv]`` live tokens per head."""
        return torch.stack([layer.fill for layer in self.layers])
