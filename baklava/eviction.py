"""Eviction settings baked into a profile: which tokens a head keeps inside its capacity."""

from __future__ import annotations

from dataclasses import asdict, dataclass

POLICIES = ("h2o", "ring")


@dataclass(frozen=True)
class EvictionConfig:
    """How each head chooses the tokens it keeps (seeds 000, 003; SnapKV, H2O, StreamingLLM).

    A head always keeps its first ``sink`` tokens and its most recent ``window`` tokens; the rest of
    its capacity holds the tokens with the highest score:

    * ``policy="h2o"``: at the end of a prefill chunk, the attention the last ``obs_window`` queries
      pay to each token (SnapKV), max-pooled over ``pool_kernel`` neighbours; during decoding that
      score keeps accumulating the attention each kept token receives (H2O).
    * ``policy="ring"``: recency only (StreamingLLM: sink + the most recent tokens).

    Keys are cached after RoPE, so eviction never recomputes positions.
    """

    sink: int = 4
    window: int = 32
    policy: str = "h2o"
    obs_window: int = 32
    # 31, not SnapKV's 7: a tokenizer that spells numbers digit by digit needs the whole needle
    # kept, and the question's attention peaks on its first tokens (BENCHMARKS.md, quality: at 0.3
    # query-aware, uniform went from 0.13 (full cache 0.38) to 0.49 (full cache 0.40)).
    pool_kernel: int = 31

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.policy!r}; known: {', '.join(POLICIES)}")
        for name in ("sink", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.obs_window < 1:
            raise ValueError("obs_window must be >= 1")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError("pool_kernel must be a positive odd number")

    def to_dict(self) -> dict:
        return asdict(self)
