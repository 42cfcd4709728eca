"""Head scorers: one module each, one registry."""

from baklava.profiles.scorers.base import HeadScorer
from baklava.profiles.scorers.cosine_scorer import CosineScorer
from baklava.profiles.scorers.entropy_scorer import EntropyScorer
from baklava.profiles.scorers.retrieval_scorer import RetrievalScorer

SCORERS: dict[str, type[HeadScorer]] = {
    cls.name: cls for cls in (CosineScorer, EntropyScorer, RetrievalScorer)
}
DEFAULT_SCORER = "retrieval"  # what BaKlaVa allocates by (BENCHMARKS.md, quality)

__all__ = ["DEFAULT_SCORER", "SCORERS", "CosineScorer", "EntropyScorer", "HeadScorer", "RetrievalScorer"]
