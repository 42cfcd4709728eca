"""Run the quality suite: one full prefill per batch, then every method and budget from it.

For a batch of samples of one task and length::

    prefill (full cache, h2o scores) ──▶ full ──compressed(caps_m,b)──▶ cache_m,b ──▶ decode ──▶ score
                                           (query-agnostic: read the question into cache_m,b first)

In the query-agnostic setting the context is scored by reconstruction by default (the model
re-reads it, :mod:`baklava.runtime.reconstruction`), since its own last tokens know nothing of the
question to come; ``agnostic_scoring="window"`` keeps the prefill's SnapKV scores instead.

:meth:`BudgetedCache.compressed` keeps exactly what a prefill straight into ``caps_m,b`` keeps
(tested), so the prefill, the expensive part, runs once per batch and setting instead of once per
method and budget. Decoding is greedy and stops when every row has produced EOS; on a GPU the
decode step is one CUDA graph per cache (:mod:`baklava.runtime.cuda_graph`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from baklava import kv_format
from baklava.bench.quality.methods import MethodContext, plan
from baklava.bench.quality.tasks import Sample
from baklava.runtime.attention import enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.cuda_graph import greedy_cuda_graph
from baklava.runtime.generate import positions_from_mask
from baklava.runtime.packed_cache import BudgetedCache
from baklava.runtime.reconstruction import pool_scores, pool_width, prompt_ids, score_by_reconstruction
from baklava.runtime.shared_selection import SELECTIONS, share_scores, use_shared

SETTINGS = ("query-aware", "query-agnostic")
AGNOSTIC_SCORING = ("reconstruct", "window")


@dataclass(frozen=True)
class Combo:
    method: str
    budget: float


def combos(methods: Iterable[str], budgets: Iterable[float]) -> list[Combo]:
    """Full cache once (it is every method at budget 1.0), then every method at every budget < 1."""
    out = [Combo("full", 1.0)]
    out += [Combo(m, b) for m in methods if m != "full" for b in sorted(budgets) if b < 1.0]
    return out


def _pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


class Runner:
    """Runs batches of samples for every combo; ``on_step`` is called once per combo (progress)."""

    def __init__(
        self,
        model,
        tokenizer,
        ctx: MethodContext,
        on_step: Callable[[], None] | None = None,
        agnostic_scoring: str = "reconstruct",
        reconstruct_pool: int | str | None = None,
        baklava_selection: str = "auto",
        prefill_chunk: int | None = None,
        kv_dtype: str = "auto",
    ):
        enable(model)
        # how every cache of the run stores its tokens (baklava.kv_format): the full prefill too,
        # so a quantized format's error reaches every method as it would in deployment
        self.kv_dtype = kv_format.parse(kv_dtype).name
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        # None: methods compress the one full prefill; N: each method's cache is prefilled in
        # N-token chunks into its capacities (what the engine deploys: no reconstruction scoring,
        # no shared selection)
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer, self.ctx = model, tokenizer, ctx
        if agnostic_scoring not in AGNOSTIC_SCORING:
            raise ValueError(f"unknown scoring {agnostic_scoring!r}; known: {', '.join(AGNOSTIC_SCORING)}")
        self.instruction = prompt_ids(tokenizer) if agnostic_scoring == "reconstruct" else None
        self.reconstruct_pool = reconstruct_pool  # None: the eviction's; "auto": by budget (pool_width)
        if baklava_selection not in SELECTIONS:
            raise ValueError(f"unknown selection {baklava_selection!r}; known: {', '.join(SELECTIONS)}")
        # which tokens BaKlaVa's heads keep (runtime/shared_selection.py): one ranking from the
        # favoured heads ("shared"), each head's own as the other methods ("own"), or by budget ("auto")
        self.baklava_selection = baklava_selection
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.on_step = on_step or (lambda: None)
        cfg = model.config
        self.shape = (
            cfg.num_hidden_layers,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        )

    # ------------------------------------------------------------------ model steps
    def _forward(self, ids, mask, cache, keep: int = 1) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` of ``ids [B, q]`` (0: all); ``mask`` covers all seen.

        Only the last position's logits by default: a 16k-token batch's full logits would not fit.
        """
        positions = positions_from_mask(mask)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **forward_cache(self.model, cache),
            logits_to_keep=keep,
        )
        return out.logits

    def _chunked(self, ids, mask, cache, keep: int = 1) -> torch.Tensor:
        """:meth:`_forward` of ``ids [B, q]`` in ``prefill_chunk``-token pieces (``mask`` covers all
        of them and what the cache already holds); the last piece's logits."""
        start = mask.shape[1] - ids.shape[1]
        for lo in range(0, ids.shape[1], self.prefill_chunk):
            hi = min(lo + self.prefill_chunk, ids.shape[1])
            logits = self._forward(ids[:, lo:hi], mask[:, : start + hi], cache, keep)
        return logits

    def _deployed(self, combo: Combo) -> bool:
        """Whether ``combo`` 's cache is prefilled in chunks (every compressing method in that mode)."""
        return self.prefill_chunk is not None and combo.method != "full"

    def _greedy(self, cache, logits, mask, steps: int) -> list[list[int]]:
        if self.device.type == "cuda":  # one CUDA graph per cache, replayed per token
            tokens = greedy_cuda_graph(self.model, cache, logits.argmax(-1), steps).tolist()
            return [t[: t.index(self.eos)] if self.eos in t else t for t in tokens]
        rows = logits.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        out = []
        for i in range(steps):
            token = logits.argmax(-1).masked_fill(done, self.eos)  # [B]
            out.append(token)
            done |= token == self.eos
            if i == steps - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = self._forward(token[:, None], mask, cache)[:, -1]
        tokens = torch.stack(out, 1).tolist()
        return [t[: t.index(self.eos)] if self.eos in t else t for t in tokens]

    def _full_cache(self, width: int) -> BudgetedCache:
        return BudgetedCache(np.full(self.shape, width), self.ctx.eviction, self.kv_dtype)

    def _compress(self, full: BudgetedCache, combo: Combo, caps, eviction) -> BudgetedCache:
        """``full`` cut to ``caps``; BaKlaVa with shared selection ranks the tokens once for all heads."""
        if combo.method != "baklava" or not use_shared(self.baklava_selection, combo.budget):
            return full.compressed(caps, eviction)
        own = [layer.scores.clone() for layer in full.layers]
        try:
            share_scores(full, caps, self.ctx.scores.kv_head)
            return full.compressed(caps, eviction)
        finally:
            for layer, scores in zip(full.layers, own, strict=True):
                layer.scores.copy_(scores)

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def run(self, samples: list[Sample], setting: str, todo: list[Combo]) -> list[dict]:
        """Rows of results for ``samples`` (one length; tasks may mix) in ``setting``, every combo.

        The batch decodes as many tokens as its longest task allows; each output is cut to its
        own task's ``max_new_tokens`` before scoring, so batching never changes a score.
        """
        if samples[0].task == "ppl":
            return self._run_ppl(samples, todo)
        steps = max(s.max_new_tokens for s in samples)
        ctx_ids, ctx_mask = _pad_left([s.context_ids for s in samples], self.pad)
        q_ids, q_mask = _pad_left([s.query_ids for s in samples], self.pad)
        ids = torch.cat([ctx_ids, q_ids], 1).to(self.device)
        mask = torch.cat([ctx_mask, q_mask], 1).to(self.device)
        width = ids.shape[1]  # the budget's reference context: prompt tokens incl. padding
        full = self._full_cache(width + steps + 1)
        split = ctx_ids.shape[1]
        raw = None  # unpooled reconstruction scores, pooled per budget with "auto"
        auto = self.reconstruct_pool == "auto"
        if setting == "query-aware":
            first = self._forward(ids, mask, full)[:, -1]
        else:
            self._forward(ids[:, :split], mask[:, :split], full)
            if self.instruction is not None and self.prefill_chunk is None:  # score by re-reading
                raw = score_by_reconstruction(
                    self.model, full, ids[:, :split], mask[:, :split], self.instruction,
                    pool_kernel=None if auto else self.reconstruct_pool,
                )  # fmt: skip
        pooled = self.ctx.eviction.pool_kernel
        rows = []
        for combo in todo:
            want = pool_width(combo.budget, self.ctx.eviction.pool_kernel)
            if raw is not None and auto and combo.method != "full" and want != pooled:  # full keeps all
                pooled = want
                pool_scores(full, raw, pooled)
            caps, eviction = plan(combo.method, combo.budget, width, self.ctx, full)
            if self._deployed(combo):
                cache = BudgetedCache(caps, eviction, self.kv_dtype)
                if setting == "query-aware":
                    logits = self._chunked(ids, mask, cache)[:, -1]
                else:  # the context alone, compressed as it arrives, then the question
                    self._chunked(ids[:, :split], mask[:, :split], cache)
                    logits = self._chunked(ids[:, split:], mask, cache)[:, -1]
            else:
                cache = self._compress(full, combo, caps, eviction)
                logits = (
                    first if setting == "query-aware" else self._forward(ids[:, split:], mask, cache)[:, -1]
                )
            outputs = self._greedy(cache, logits, mask, steps)
            for s, out in zip(samples, outputs, strict=True):
                text = self.tokenizer.decode(out[: s.max_new_tokens], skip_special_tokens=True)
                rows.append(self._row(s, setting, combo, caps, width, score=s.score(text), output=text))
            self.on_step()
        return rows

    def _run_ppl(self, samples: list[Sample], todo: list[Combo]) -> list[dict]:
        ctx = torch.tensor([s.context_ids for s in samples], device=self.device)
        cont = torch.tensor([s.query_ids for s in samples], device=self.device)
        width = ctx.shape[1] + cont.shape[1]
        mask = torch.ones(len(samples), width, dtype=torch.long, device=self.device)
        full = self._full_cache(width + 1)
        last = self._forward(ctx, mask[:, : ctx.shape[1]], full)[:, -1:]  # predicts cont[:, 0]
        rows = []
        for combo in todo:
            caps, eviction = plan(combo.method, combo.budget, width, self.ctx, full)
            head = last
            if self._deployed(combo):
                cache = BudgetedCache(caps, eviction, self.kv_dtype)
                head = self._chunked(ctx, mask[:, : ctx.shape[1]], cache)[:, -1:]
            else:
                cache = self._compress(full, combo, caps, eviction)
            logits = torch.cat([head, self._forward(cont, mask, cache, keep=0)[:, :-1]], 1).float()
            nll = F.cross_entropy(logits.transpose(1, 2), cont, reduction="none").mean(1)  # [B]
            for s, value in zip(samples, nll.tolist(), strict=True):
                rows.append(self._row(s, "-", combo, caps, width, score=math.exp(value), output=""))
            self.on_step()
        return rows

    def _row(
        self, s: Sample, setting: str, combo: Combo, caps, width: int, *, score: float, output: str
    ) -> dict:
        layers, heads = self.shape
        return {
            "task": s.task,
            "length": s.length,
            "index": s.index,
            "setting": setting,
            "method": combo.method,
            "budget": combo.budget,
            "kv_dtype": self.kv_dtype,
            "score": score,
            "output": output,
            "answers": s.answers,
            "prompt_tokens": s.num_tokens,
            "kv_fraction": float(np.minimum(caps, width).sum() / (layers * heads * width)),
        }
