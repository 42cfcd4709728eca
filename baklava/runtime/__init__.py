"""Runtime: the packed per-head cache, its attention, and the generate loop."""

from baklava.runtime.attention import enable
from baklava.runtime.generate import decode_one_token, generate, prefill
from baklava.runtime.packed_cache import BudgetedCache, BudgetedLayer

__all__ = ["BudgetedCache", "BudgetedLayer", "decode_one_token", "enable", "generate", "prefill"]
