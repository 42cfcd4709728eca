"""The allocation search's objectives: what each perplexity reads, and the search's record."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baklava.eviction import EvictionConfig
from baklava.profiles.allocation_search import heldout_nll, search_allocation
from baklava.profiles.head_scores import HeadScores

EVICTION = EvictionConfig(sink=2, window=4)
CONTEXT = 24


def _text(n=CONTEXT + 8):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(1))


def _plain_nll(model, seq: torch.Tensor, first: int) -> float:
    """NLL of ``seq[first:]`` by one uncached forward over ``seq``."""
    with torch.inference_mode():
        logits = model(input_ids=seq[None]).logits[0, first - 1 : -1].float()
    return float(F.cross_entropy(logits, seq[first:], reduction="sum"))


def test_full_cache_nll_is_the_plain_forwards(tiny_llama):
    ids, prompt = _text(), [5, 6, 7]
    nll, n = heldout_nll(tiny_llama, None, EVICTION, ids, CONTEXT)
    assert n == ids.numel() - CONTEXT
    assert nll == pytest.approx(_plain_nll(tiny_llama, ids, CONTEXT), rel=1e-4)
    # reconstruction: the context again after the instruction, every context token scored
    nll, n = heldout_nll(tiny_llama, None, EVICTION, ids, CONTEXT, instruction=prompt)
    seq = torch.cat([ids[:CONTEXT], torch.tensor(prompt), ids[:CONTEXT]])
    assert n == CONTEXT
    assert nll == pytest.approx(_plain_nll(tiny_llama, seq, CONTEXT + len(prompt)), rel=1e-4)


def test_the_compressed_cache_changes_the_reconstruction(tiny_llama):
    ids = _text()
    full, _ = heldout_nll(tiny_llama, None, EVICTION, ids, CONTEXT, instruction=[5, 6])
    small, _ = heldout_nll(tiny_llama, np.full((2, 2), 8), EVICTION, ids, CONTEXT, instruction=[5, 6])
    assert small != pytest.approx(full, rel=1e-3)  # the compressed context changes what it reads


def test_search_records_its_objective_and_checks_it(tiny_llama):
    scores = HeadScores(np.array([[1.0, 0.1], [0.5, 2.0]]), np.ones(2))
    texts = [_text(), _text()]
    kw = dict(
        context_len=CONTEXT, eviction=EVICTION, min_cap=2, grid={"sharpness": (1.0,), "floor_frac": (0.1,)}
    )
    res = search_allocation(tiny_llama, scores, 0.3, texts, instruction=[5, 6], progress=False, **kw)
    assert res.objective == "reconstruction" and len(res.candidates) == 2  # uniform + one candidate
    assert res.to_dict()["objective"] == "reconstruction"
    cont = search_allocation(tiny_llama, scores, 0.3, texts, objective="continuation", progress=False, **kw)
    assert cont.full_ppl != pytest.approx(res.full_ppl)  # a different text is scored
    with pytest.raises(ValueError, match="instruction"):
        search_allocation(tiny_llama, scores, 0.3, texts, progress=False, **kw)
    with pytest.raises(ValueError, match="objective"):
        search_allocation(tiny_llama, scores, 0.3, texts, objective="bleu", progress=False, **kw)
