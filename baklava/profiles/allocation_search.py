"""Pick allocation parameters by perplexity on held-out calibration text (the BaKlaVa proxy).

For each candidate ``(sharpness, floor_frac)`` the allocator is run at the *same budget fraction*
but at the search context length (so a 0.3 budget evicts 70% of a 1k-token context just as it
would of an 8k one); the model prefills the context into a :class:`BudgetedCache`, which
compresses it, then reads the held-out continuation in one chunk. The candidate with the lowest
perplexity of the continuation wins. Uniform and full-cache perplexities are recorded beside it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from baklava.profiles.allocators import BaklavaAllocator, UniformAllocator
from baklava.profiles.allocators.base import Allocator
from baklava.profiles.eviction import EvictionConfig
from baklava.profiles.head_scores import HeadScores

DEFAULT_GRID = {"sharpness": (0.5, 1.0, 2.0), "floor_frac": (0.1, 0.3)}


@torch.inference_mode()
def continuation_nll(
    model, capacities, eviction: EvictionConfig, ids: torch.Tensor, context_len: int
) -> tuple[float, int]:
    """Summed NLL and token count of ``ids[context_len:]`` given ``ids[:context_len]`` compressed.

    ``capacities`` ``[L, H_kv]``; ``None`` means the full cache (no budget).
    """
    from baklava.runtime import BudgetedCache, enable

    enable(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    caps = capacities if capacities is not None else np.full(_shape(model), ids.numel())
    cache = BudgetedCache(caps, eviction)
    ctx, cont = ids[:context_len][None], ids[context_len:][None]
    last = model(input_ids=ctx, past_key_values=cache).logits[:, -1:]  # predicts cont[0]
    logits = torch.cat([last, model(input_ids=cont, past_key_values=cache).logits[:, :-1]], dim=1)
    nll = F.cross_entropy(logits[0].float(), cont[0], reduction="sum")
    return float(nll), int(cont.numel())


def _shape(model) -> tuple[int, int]:
    cfg = model.config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def perplexity(
    model, capacities, eviction: EvictionConfig, texts: list[torch.Tensor], context_len: int
) -> float:
    total, count = 0.0, 0
    for ids in texts:
        nll, n = continuation_nll(model, capacities, eviction, ids, context_len)
        total, count = total + nll, count + n
    return math.exp(total / count)


@dataclass
class SearchResult:
    """Outcome of :func:`search_allocation`, recorded in the profile."""

    best: dict
    candidates: list[dict]
    uniform_ppl: float
    full_ppl: float
    context_len: int
    fraction: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def search_allocation(
    model,
    scores: HeadScores,
    fraction: float,
    texts: list[torch.Tensor],
    *,
    context_len: int,
    eviction: EvictionConfig,
    min_cap: int,
    grid: dict | None = None,
    progress: bool = True,
) -> SearchResult:
    """Grid search of :class:`BaklavaAllocator` parameters by held-out perplexity.

    Parameters
    ----------
    fraction : float
        Budget as a fraction of the full cache (any budget form converts to one).
    texts : list of torch.Tensor
        Held-out token windows, each longer than ``context_len``.
    """
    grid = grid or DEFAULT_GRID
    n_heads = scores.kv_head.size
    total = max(n_heads, round(fraction * context_len * n_heads))
    search_min = max(1, min(min_cap, total // n_heads))

    def caps_of(alloc: Allocator) -> np.ndarray:
        return alloc.allocate(scores, total, min_cap=search_min, max_cap=context_len)

    candidates = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    bar = tqdm(total=len(candidates) + 2, desc="allocation search", unit="eval", disable=not progress)
    full_ppl = perplexity(model, None, eviction, texts, context_len)
    bar.update()
    uniform_ppl = perplexity(model, caps_of(UniformAllocator()), eviction, texts, context_len)
    bar.update()
    # sharpness 0 is the uniform split: a candidate too, so the search never does worse than uniform
    rows = [{**{k: 0.0 for k in grid}, "ppl": round(uniform_ppl, 4)}] if "sharpness" in grid else []
    for params in candidates:
        ppl = perplexity(model, caps_of(BaklavaAllocator(**params)), eviction, texts, context_len)
        rows.append({**params, "ppl": round(ppl, 4)})
        bar.set_postfix(best=min(r["ppl"] for r in rows))
        bar.update()
    bar.close()
    best = min(rows, key=lambda r: r["ppl"])  # first minimum: uniform wins ties
    return SearchResult(
        best={k: best[k] for k in grid},
        candidates=rows,
        uniform_ppl=round(uniform_ppl, 4),
        full_ppl=round(full_ppl, 4),
        context_len=context_len,
        fraction=fraction,
    )
