"""Pick allocation parameters on held-out calibration text (the BaKlaVa proxy).

For each candidate ``(sharpness, floor_frac)`` the allocator is run at the *same budget fraction*
but at the search context length (so a 0.3 budget evicts 70% of a 1k-token context just as it
would of an 8k one); the model prefills the context into a :class:`BudgetedCache`, which
compresses it, then is scored on what it can still do with it. Two objectives:

``reconstruction`` (default)
    Perplexity of the context itself, read again after ``"Repeat the previous context exactly."``
    (:data:`baklava.runtime.reconstruction.PROMPT`). A cache that lets the model reproduce its
    context keeps whatever a later question may ask for (KVzip's argument); it is what a long
    context's retrieval needs, and it reads ``context_len`` tokens per text.
``continuation``
    Perplexity of the text that follows the context. Mostly recency: StreamingLLM wins it, and on
    Qwen2.5-Coder-0.5B it chose uniform at budget 0.2 over allocations that retrieve far better.

The candidate with the lowest perplexity wins; uniform (sharpness 0) is a candidate, and uniform
and full-cache perplexities are recorded beside it.

The grid's floor is half the uniform share (``DEFAULT_FLOORS``): every head keeps at least half of
what uniform would give it, and the search only decides how sharply the other half goes to the
important heads. Reconstruction rewards starving every head but the few retrieval heads (repeating
text needs only them); with floors of 0.1 and 0.3 it picked 16-20 slots for 70-80 of SmolLM2-135M's
90 heads at budgets 0.05 and 0.1, and the model then failed even with the question in the prompt
(0.002 against uniform's 0.117). Answering needs the other heads too, and no held-out perplexity
(continuation included) told the two apart. Half-share floors leave SmolLM2 level with uniform at
0.05 and lift Qwen2.5-Coder at 0.05 and 0.1; at 0.3 they cost SmolLM2 (BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from baklava.eviction import EvictionConfig
from baklava.profiles.allocators import BaklavaAllocator, UniformAllocator
from baklava.profiles.allocators.baklava_allocator import DEFAULT_FLOOR_FRAC
from baklava.profiles.allocators.base import Allocator
from baklava.profiles.head_scores import HeadScores
from baklava.runtime.cache_keyword import forward_cache

DEFAULT_SHARPNESS = (0.5, 1.0, 2.0)
DEFAULT_FLOORS = (DEFAULT_FLOOR_FRAC,)
DEFAULT_GRID = {"sharpness": DEFAULT_SHARPNESS, "floor_frac": DEFAULT_FLOORS}
OBJECTIVES = ("reconstruction", "continuation")


@torch.inference_mode()
def heldout_nll(
    model,
    capacities,
    eviction: EvictionConfig,
    ids: torch.Tensor,
    context_len: int,
    instruction: Sequence[int] | None = None,
) -> tuple[float, int]:
    """Summed NLL and token count of the target given ``ids[:context_len]`` compressed.

    The target is ``ids[context_len:]`` (continuation), or with ``instruction`` the context itself,
    read after the instruction's tokens (reconstruction). ``capacities`` ``[L, H_kv]``; ``None``
    means the full cache (no budget).
    """
    from baklava.runtime import BudgetedCache, enable

    enable(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    ctx = ids[:context_len]
    prompt = torch.tensor(list(instruction or ()), dtype=ids.dtype, device=device)
    target = ctx if instruction else ids[context_len:]
    fed = torch.cat([prompt, target])[None]
    caps = capacities if capacities is not None else np.full(_shape(model), ctx.numel() + fed.shape[1])
    cache = BudgetedCache(caps, eviction)
    last = model(input_ids=ctx[None], **forward_cache(model, cache), logits_to_keep=1).logits  # [1, 1, V]
    logits = model(input_ids=fed, **forward_cache(model, cache)).logits[
        :, :-1
    ]  # logits[i] predicts fed[i + 1]
    if prompt.numel():
        logits = logits[:, prompt.numel() - 1 :]  # from the instruction's last token: the target
    else:
        logits = torch.cat([last, logits], dim=1)  # the context's last token predicts target[0]
    nll = F.cross_entropy(logits[0].float(), target, reduction="sum")
    return float(nll), int(target.numel())


def _shape(model) -> tuple[int, int]:
    cfg = model.config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def perplexity(
    model,
    capacities,
    eviction: EvictionConfig,
    texts: list[torch.Tensor],
    context_len: int,
    instruction: Sequence[int] | None = None,
) -> float:
    total, count = 0.0, 0
    for ids in texts:
        nll, n = heldout_nll(model, capacities, eviction, ids, context_len, instruction)
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
    objective: str = "continuation"

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
    objective: str = "reconstruction",
    instruction: Sequence[int] | None = None,
    progress: bool = True,
) -> SearchResult:
    """Grid search of :class:`BaklavaAllocator` parameters by held-out perplexity.

    Parameters
    ----------
    fraction : float
        Budget as a fraction of the full cache (any budget form converts to one).
    texts : list of torch.Tensor
        Held-out token windows, each longer than ``context_len``.
    objective : str
        ``"reconstruction"`` or ``"continuation"`` (module docstring).
    instruction : sequence of int
        The reconstruction prompt's token ids (:func:`baklava.runtime.reconstruction.prompt_ids`);
        needed for ``"reconstruction"``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown search objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if objective == "reconstruction" and not instruction:
        raise ValueError("the reconstruction objective needs the instruction's token ids")
    prompt = instruction if objective == "reconstruction" else None
    grid = grid or DEFAULT_GRID
    n_heads = scores.kv_head.size
    total = max(n_heads, round(fraction * context_len * n_heads))
    search_min = max(1, min(min_cap, total // n_heads))

    def caps_of(alloc: Allocator) -> np.ndarray:
        return alloc.allocate(scores, total, min_cap=search_min, max_cap=context_len)

    candidates = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    bar = tqdm(total=len(candidates) + 2, desc="allocation search", unit="eval", disable=not progress)
    full_ppl = perplexity(model, None, eviction, texts, context_len, prompt)
    bar.update()
    uniform_ppl = perplexity(model, caps_of(UniformAllocator()), eviction, texts, context_len, prompt)
    bar.update()
    # sharpness 0 is the uniform split: a candidate too, so the search never does worse than uniform
    rows = [{**{k: 0.0 for k in grid}, "ppl": round(uniform_ppl, 4)}] if "sharpness" in grid else []
    for params in candidates:
        ppl = perplexity(model, caps_of(BaklavaAllocator(**params)), eviction, texts, context_len, prompt)
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
        objective=objective,
    )
