"""Profile -> allocate: the steps behind ``baklava-profile`` and ``baklava-export``.

model ──profile_model──▶ HeadScores ──allocator (+ perplexity search)──▶ capacities
                              └──────────────── BudgetProfile ◀───────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from baklava import kv_format
from baklava.errors import BudgetError
from baklava.eviction import EvictionConfig
from baklava.profiles import calibration as calib
from baklava.profiles.allocation_search import DEFAULT_FLOORS, DEFAULT_SHARPNESS, search_allocation
from baklava.profiles.allocators import ALLOCATORS, make_allocator
from baklava.profiles.budget import Budget
from baklava.profiles.profile_file import BudgetProfile, ModelInfo
from baklava.profiles.profiler import profile_model
from baklava.profiles.scorers import DEFAULT_SCORER


@dataclass
class CalibrationSettings:
    """How much text the profiler and the allocation search read (defaults fit a 2-core CPU)."""

    path: str | None = None  # None: pydoc_data.topics prose
    samples: int = 4
    seq_len: int = 1024
    search_texts: int = 2
    search_context: int = 1024
    search_continuation: int = 128
    search_objective: str = "reconstruction"  # allocation_search.OBJECTIVES
    search_floors: tuple[float, ...] = DEFAULT_FLOORS  # floor_frac values of the search's grid

    def build(self, tokenizer) -> calib.CalibrationSet:
        text, description = calib.read_text(self.path)
        return calib.build(
            tokenizer,
            text,
            description,
            num_samples=self.samples,
            seq_len=self.seq_len,
            num_heldout=self.search_texts,
            heldout_len=self.search_context + self.search_continuation,
        )


def score(
    lm, settings: CalibrationSettings | None = None, *, method: str = DEFAULT_SCORER, progress: bool = True
) -> BudgetProfile:
    """Profile ``lm`` (a :class:`~baklava.model_zoo.LoadedModel`); returns a scores-only profile."""
    settings = settings or CalibrationSettings()
    cal = settings.build(lm.tokenizer)
    scores = profile_model(lm.model, cal, method=method, progress=progress)
    return BudgetProfile(model=ModelInfo.from_config(lm.model.config, lm.name), scores=scores)


def resolve_budget(
    info: ModelInfo,
    budget: Budget | str | float,
    *,
    max_context: int | None = None,
    min_cap: int = 16,
    batch: int = 1,
    dtype_bytes: int = 2,
) -> tuple[Budget, int, int]:
    """Check a budget against a model before any expensive work; returns ``(budget, total, context)``.

    Raises :class:`BudgetError` for a context out of range, a budget over the full cache, or one
    below the floors (``L * H_kv * min_cap``).
    """
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    context = max_context or info.max_context
    if not 1 <= context <= info.max_context:
        raise BudgetError(f"--max-context {context} outside [1, {info.max_context}] for {info.name}")
    total = budget.total_tokens(
        info.num_layers,
        info.num_kv_heads,
        context,
        head_dim=info.head_dim,
        batch=batch,
        dtype_bytes=dtype_bytes,
    )
    heads, floor = info.num_layers * info.num_kv_heads, min(min_cap, context)
    if total < heads * floor:
        raise BudgetError(
            f"budget {budget.text!r} gives {total} token slots, smaller than the floor of {heads} heads x "
            f"min_cap {floor} = {heads * floor}; raise the budget or lower --min-cap"
        )
    return budget, total, context


def allocate(
    profile: BudgetProfile,
    budget: Budget | str | float,
    *,
    lm=None,
    method: str = "baklava",
    max_context: int | None = None,
    min_cap: int = 16,
    batch: int = 1,
    dtype_bytes: float | None = None,
    kv_dtype: str = "auto",
    eviction: EvictionConfig | None = None,
    search: bool = True,
    params: dict | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
) -> BudgetProfile:
    """Return a copy of ``profile`` with capacities for ``budget``.

    Parameters
    ----------
    budget : Budget or str
        ``0.3`` (fraction of the full cache at ``max_context``), ``512`` (tokens per head), or
        ``"2GiB"`` (KV memory for ``batch`` sequences of ``dtype_bytes`` elements).
    dtype_bytes, kv_dtype
        Bytes a cache channel costs, and the storage format it was worked out for
        (:mod:`baklava.kv_format`; recorded in the allocation, the runtime stores tokens that way).
        Default: the format's bytes for ``head_dim``, ``auto`` = the model's dtype.
    lm : LoadedModel, optional
        Needed for the perplexity search (``method="baklava"`` with ``search=True``).
    params : dict, optional
        Allocator parameters; for ``baklava`` they skip the search.
    """
    if method not in ALLOCATORS:
        raise BudgetError(f"unknown allocation method {method!r}; known: {', '.join(sorted(ALLOCATORS))}")
    info = profile.model
    if dtype_bytes is None:
        model_bytes = lm.model.dtype.itemsize if lm is not None else 2
        dtype_bytes = kv_format.element_bytes(kv_dtype, info.head_dim, model_bytes)
    budget, total, context = resolve_budget(
        info, budget, max_context=max_context, min_cap=min_cap, batch=batch, dtype_bytes=dtype_bytes
    )
    fraction = total / (info.num_layers * info.num_kv_heads * context)
    eviction = eviction or profile.eviction
    searched = None
    if method == "baklava" and params is None and search and fraction < 1.0:
        if lm is None:
            raise ValueError("the perplexity search needs the model (pass lm=..., or search=False)")
        from baklava.runtime.reconstruction import prompt_ids

        settings = settings or CalibrationSettings()
        cal = settings.build(lm.tokenizer)
        searched = search_allocation(
            lm.model,
            profile.scores,
            fraction,
            cal.heldout,
            context_len=settings.search_context,
            eviction=eviction,
            min_cap=min_cap,
            objective=settings.search_objective,
            grid={"sharpness": DEFAULT_SHARPNESS, "floor_frac": tuple(settings.search_floors)},
            instruction=prompt_ids(lm.tokenizer),
            progress=progress,
        )
        params = searched.best
    allocator = make_allocator(method, **(params or {}))
    caps = allocator.allocate(profile.scores, total, min_cap=min(min_cap, context), max_cap=context)
    allocation = {
        "method": method,
        "params": allocator.params(),
        "budget": budget.text,
        "budget_kind": budget.kind,
        "total_tokens": int(total),
        "fraction": round(fraction, 6),
        "reference_context": context,
        "min_cap": min_cap,
        "batch": batch,
        "dtype_bytes": dtype_bytes,
        "kv_dtype": kv_format.parse(kv_dtype).name,
        "search": searched.to_dict() if searched else None,
    }
    return BudgetProfile(
        model=info,
        scores=profile.scores,
        eviction=eviction,
        capacities=np.asarray(caps),
        allocation=allocation,
    )


def make_profile(
    lm, budget, *, settings: CalibrationSettings | None = None, progress: bool = True, **allocate_kwargs
):
    """Profile ``lm`` and allocate ``budget`` in one call (what ``baklava-export`` does)."""
    with torch.inference_mode():
        scored = score(lm, settings, progress=progress)
    return allocate(scored, budget, lm=lm, settings=settings, progress=progress, **allocate_kwargs)
