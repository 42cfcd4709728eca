"""BaKlaVa: per-KV-head cache budgets for long-context LLM inference.

Profile a model once, give every KV head its own token capacity, and run or export the model
with a packed per-head cache. See README.md for the quick start and DESIGN.md for the data flow.

The public API is imported lazily, so ``import baklava`` (and the CLI's error paths) stay fast::

    lm = baklava.load_model("smollm2-135m")
    profile = baklava.make_profile(lm, budget=0.3)
    cache = baklava.BudgetedCache.from_profile(profile, model=lm.model)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "baklava.model_zoo",
    "make_profile": "baklava.profiles.pipeline",
    "allocate": "baklava.profiles.pipeline",
    "CalibrationSettings": "baklava.profiles.pipeline",
    "BudgetProfile": "baklava.profiles.profile_file",
    "EvictionConfig": "baklava.eviction",
    "Budget": "baklava.profiles.budget",
    "BudgetedCache": "baklava.runtime.packed_cache",
    "enable": "baklava.runtime.attention",
    "generate": "baklava.runtime.generate",
    "prefill": "baklava.runtime.generate",
    "decode_one_token": "baklava.runtime.generate",
    "compress_context": "baklava.runtime.context_compression",
    "read_artifact": "baklava.exporter.artifact",
    "BaklavaError": "baklava.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'baklava' has no attribute {name!r}")
