"""One decode token for every head of a packed layer at once (no Python loop over heads).

:meth:`BudgetedLayer.attend` runs this for one-token steps; the per-head loop there stays the
reference for prefill chunks and is the oracle of the tests, which check this path against it
slot for slot. Same semantics:

* attention of each query group over its head's live slots plus the new token (fp32 softmax);
* with ``policy="h2o"`` every live slot's score grows by the attention it received, averaged
  over the query group, and the new token's score is its own;
* a head with room appends; a full head drops its lowest-priority candidate (ties: the newest,
  as the reference's stable sort does) and, if that is a stored slot, shifts the slots after it
  left by one so the head stays in arrival order, then writes the new token last.

Every step is a fixed set of tensor ops over the layer's ``sum(cap)`` slots, which is what a GPU
wants (and what the Triton decode kernel replaces for the attention half).
"""

from __future__ import annotations

import torch

from baklava.runtime.selection import keep_priority


class SlotMap:
    """Static per-slot indices of a packed layer: which head owns a slot, and its rank there."""

    def __init__(self, capacities: list[int], device):
        caps = torch.tensor(capacities, dtype=torch.int64, device=device)
        self.caps = caps  # [H]
        self.offsets = torch.cumsum(caps, 0) - caps  # [H]
        self.head = torch.repeat_interleave(torch.arange(len(capacities), device=device), caps)  # [T]
        self.index = torch.arange(int(caps.sum()), device=device)  # [T]
        self.rank = self.index - self.offsets[self.head]  # [T]
        self.last = self.offsets + caps - 1  # [H] last slot of each head
        self.own = self.head[None, :] == torch.arange(len(capacities), device=device)[:, None]  # [H, T]
        self._by_query: dict[int, torch.Tensor] = {}

    def owned_by_query(self, group: int) -> torch.Tensor:
        """``[H_q, T]``: True where the slot belongs to the query head's KV head."""
        if group not in self._by_query:
            self._by_query[group] = self.own.repeat_interleave(group, dim=0)
        return self._by_query[group]


def decode_step(
    layer,
    query: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_slots: dict,
    valid: torch.Tensor,
    scaling: float,
):
    """Attend and commit one token per row (advancing ``layer.valid_seen``); returns ``[B, H_q, 1, D]``.

    ``query [B, H_q, 1, D]``, ``k_new/v_new [B, H_kv, 1, D]`` (as the cache gives them back),
    ``new_slots``: what each slot tensor stores for them (``{name: [B, H_kv, 1, width]}``,
    :func:`baklava.runtime.kv_slots.encode`), ``valid [B]`` (False: padding).
    """
    slots: SlotMap = layer.slot_map
    batch, q_heads, _, dim = query.shape
    heads = layer.num_heads
    group = q_heads // heads
    head = slots.head
    q = query[:, :, 0].float().view(batch, heads, group, dim)  # [B, H, g, D]
    kn, vn = k_new[:, :, 0].float(), v_new[:, :, 0].float()  # [B, H, D]

    # ---------------------------------------------------------------- attention (fp32 softmax)
    # Dense over the layer's slots with a static owner mask: every query row scores all sum(cap)
    # slots and masks the other heads' (H_kv x more dot products, but no atomics and one matmul).
    live = slots.rank[None, :] < layer.fill[:, head]  # [B, T]
    allowed = slots.owned_by_query(group)[None] & live[:, None, :]  # [B, H_q, T]
    qf = q.reshape(batch, q_heads, dim)
    logits = torch.einsum("bqd,btd->bqt", qf, layer.stored("keys").float()) * scaling  # [B, H_q, T]
    logits = logits.masked_fill(~allowed, float("-inf"))
    new_logit = (qf * kn.repeat_interleave(group, dim=1)).sum(-1) * scaling  # [B, H_q]
    new_logit = new_logit.masked_fill(~valid[:, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(torch.cat([logits, new_logit[..., None]], -1), -1)  # [B, H_q, T + 1]
    p, p_new = probs[..., :-1], probs[..., -1]
    out = torch.einsum("bqt,btd->bqd", p, layer.stored("values").float()) + p_new[
        ..., None
    ] * vn.repeat_interleave(group, dim=1)  # [B, H_q, D]

    # ---------------------------------------------------------------- scores
    ev = layer.eviction
    new_score = torch.zeros(batch, heads, device=query.device)
    if ev.policy == "h2o":  # a slot's only nonzero probabilities come from its own query group
        q_ok = valid.float()[:, None]
        layer.scores += p.sum(1) / group * q_ok  # [B, T]
        new_score = p_new.view(batch, heads, group).mean(-1) * q_ok
    _commit(layer, {name: new[:, :, 0] for name, new in new_slots.items()}, new_score, valid)
    layer.valid_seen += valid
    return out[:, :, None].to(query.dtype)


def _commit(layer, new: dict, new_score, valid) -> None:
    """Append the new token (``new``: each slot tensor's ``[B, H_kv, width]``) to every head with
    room; evict the lowest priority in full heads."""
    slots: SlotMap = layer.slot_map
    head, heads = slots.head, layer.num_heads
    ev = layer.eviction
    batch = valid.shape[0]
    fill = layer.fill
    seen_after = layer.valid_seen + valid.long()  # [B]
    live = slots.rank[None, :] < fill[:, head]  # [B, T]
    pri = keep_priority(
        layer.positions, layer.scores, live, seen_after, sink=ev.sink, window=ev.window, policy=ev.policy
    )  # [B, T]
    new_pos = layer.valid_seen[:, None].expand(batch, heads)
    new_pri = keep_priority(
        new_pos,
        new_score,
        valid[:, None].expand(batch, heads),
        seen_after,
        sink=ev.sink,
        window=ev.window,
        policy=ev.policy,
    )  # [B, H]
    full = fill >= slots.caps[None, :]  # [B, H]
    own = slots.own[None]  # [1, H, T]
    worst = torch.where(own & live[:, None], pri[:, None], float("inf")).amin(-1)  # [B, H]
    # the lowest candidate is dropped; ties drop the newest, so the new token goes first
    evict_stored = full & valid[:, None] & (new_pri > worst)
    at_worst = own & live[:, None] & (pri[:, None] == worst[..., None])  # [B, H, T]
    victim = torch.where(at_worst, slots.index, -1).amax(-1)  # [B, H]

    # shift the slots after the victim left by one: source index per slot
    shift = (
        evict_stored[:, head]
        & (slots.index[None] >= victim[:, head])
        & (slots.index[None] < slots.last[head])
    )
    src = slots.index[None] + shift.long()  # [B, T]
    for name in layer.slot_names:  # a slot's payload and scales move together
        buf = getattr(layer, name)
        buf.copy_(buf.gather(1, src[..., None].expand_as(buf)))
    for name in ("positions", "scores"):
        buf = getattr(layer, name)
        buf.copy_(buf.gather(1, src))

    # where the new token lands: the first free slot, or the last slot after a shift. Heads that
    # write nothing rewrite their last slot with its own value: no host sync, so a CUDA graph can
    # capture the whole step.
    append = ~full & valid[:, None]
    write = append | evict_stored  # [B, H]
    dest = torch.where(append, slots.offsets[None] + fill, slots.last[None].expand(batch, heads))  # [B, H]
    for name, token in new.items():
        buf = getattr(layer, name)
        idx = dest[..., None].expand(-1, -1, buf.shape[-1])
        buf.scatter_(1, idx, torch.where(write[..., None], token.to(buf.dtype), buf.gather(1, idx)))
    for name, new in (("positions", new_pos), ("scores", new_score)):
        buf = getattr(layer, name)
        buf.scatter_(1, dest, torch.where(write, new.to(buf.dtype), buf.gather(1, dest)))
    layer.fill += append.long()
