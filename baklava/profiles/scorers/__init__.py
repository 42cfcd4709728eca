"""Head scorers: one module each, one registry."""

from baklava.profiles.scorers.base import HeadScorer
from baklava.profiles.scorers.cosine_scorer import CosineScorer
from baklava.profiles.scorers.entropy_scorer import EntropyScorer

SCORERS: dict[str, type[HeadScorer]] = {cls.name: cls for cls in (CosineScorer, EntropyScorer)}

__all__ = ["SCORERS", "CosineScorer", "EntropyScorer", "HeadScorer"]
