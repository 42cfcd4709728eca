"""End to end on the real default model (SmolLM2-135M-Instruct, fetched once into the user cache)."""

import json

import pytest
import torch

from baklava.cli import run_main
from baklava.exporter import read_artifact
from baklava.runtime import BudgetedCache
from baklava.runtime.cache_keyword import generate_cache
from baklava.runtime.generate import encode
from tests.conftest import export_smol

pytestmark = pytest.mark.model

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a CPU executes an instruction, step by step.",
    "Describe each planet of the solar system and what makes it special.",
]


def _export(tmp_path, budget, capfd):
    out = export_smol(tmp_path / f"smol-{budget}", budget)
    capfd.readouterr()  # drop the export's output before reading the run's
    return out


def test_budget_one_matches_plain_transformers_token_for_token(smol, tmp_path, capfd):
    art = _export(tmp_path, "1.0", capfd)
    argv = [str(art), "--json", "--max-new-tokens", "64"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    run_main(argv)
    got = [json.loads(line)["token_ids"] for line in capfd.readouterr().out.splitlines()]

    batch = encode(smol.tokenizer, PROMPTS, chat=True, max_context=8192)
    with torch.inference_mode():
        smol.model.set_attn_implementation("sdpa")
        ref = smol.model.generate(
            **batch,
            max_new_tokens=64,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=smol.tokenizer.pad_token_id,
        )
    ref = ref[:, batch["input_ids"].shape[1] :].tolist()
    for mine, theirs in zip(got, ref, strict=True):
        assert len(mine) == 64  # long answers: the comparison covers all 64 tokens
        assert mine == theirs[:64]


def test_budget_point_three_allocates_exactly_the_budgeted_bytes(smol, tmp_path, capfd):
    art = read_artifact(_export(tmp_path, "0.3", capfd))
    caps = art.profile.capacities
    assert caps.sum() == round(0.3 * 30 * 3 * 8192)
    assert caps.min() >= 16 and caps.max() <= 8192
    batch_size, head_dim, dtype_bytes = 2, 64, smol.model.dtype.itemsize
    cache = BudgetedCache.from_profile(art.profile, model=smol.model)
    batch = encode(smol.tokenizer, PROMPTS[:2], chat=True, max_context=8192)
    with torch.inference_mode():
        smol.model.generate(
            **batch,
            **generate_cache(smol.model, cache),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=smol.tokenizer.pad_token_id,
        )
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    expected = int(caps.sum()) * 2 * head_dim * dtype_bytes * batch_size
    assert abs(measured - expected) <= 0.01 * expected
    assert measured == expected
    # 30% of what a full cache at the reference context would take
    full = 30 * 3 * 8192 * 2 * head_dim * dtype_bytes * batch_size
    assert abs(measured / full - 0.3) < 1e-4


def test_evicting_cache_keeps_a_long_prompt_coherent(smol):
    """A 2k-token prompt through 256-token heads: the cache stays at its budget and still finds a
    needle in the middle of the prompt (query-aware SnapKV selection at the end of prefill)."""
    from baklava.eviction import EvictionConfig
    from baklava.profiles.calibration import default_text
    from baklava.runtime import generate

    text = default_text()[:9000]
    cache = BudgetedCache(torch.full((30, 3), 256).numpy(), EvictionConfig())
    prompt = (
        text[:4000] + "\nThe secret word is 'pineapple'.\n" + text[4000:] + "\n\nWhat is the secret word?"
    )
    [result] = generate(smol.model, smol.tokenizer, cache, [prompt], max_new_tokens=12)
    assert result.prompt_tokens > 1500
    assert (cache.fill_levels() == 256).all()
    assert "pineapple" in result.text.lower()
