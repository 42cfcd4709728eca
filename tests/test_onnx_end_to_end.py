"""The exported SmolLM2 graph in ONNX Runtime against the PyTorch reference, token for token."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnx extra not installed")
onnx = pytest.importorskip("onnx")

from baklava.exporter import read_artifact  # noqa: E402
from baklava.runtime import BudgetedCache  # noqa: E402
from baklava.runtime.generate import encode  # noqa: E402
from baklava.runtime.onnx_backend import generate_onnx, load_decoder  # noqa: E402
from tests.conftest import export_smol  # noqa: E402

pytestmark = pytest.mark.model

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a CPU executes an instruction, step by step.",
    "Describe each planet of the solar system and what makes it special.",
    "What is the capital of France?",
    "List ten tips for staying healthy and explain each one.",
]
STEPS, LOGIT_STEPS = 64, 8


@pytest.mark.parametrize(("budget", "extra"), [("1.0", ["--max-context", "2048"]), ("0.3", [])])
def test_onnxruntime_matches_pytorch(smol, tmp_path, budget, extra):
    out = export_smol(tmp_path / f"smol-{budget}", budget, *extra)
    art = read_artifact(out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    onnx.shape_inference.infer_shapes(graph, strict_mode=True)  # (onnx.checker ran during export)
    slots = {
        i.name: i.type.tensor_type.shape.dim[1].dim_value for i in graph.graph.input if "past." in i.name
    }
    assert [slots[f"past.{layer}.key"] for layer in range(30)] == art.profile.capacities.sum(1).tolist()
    results, ort_logits = generate_onnx(
        load_decoder(out, art.manifest),
        smol.tokenizer,
        PROMPTS,
        max_new_tokens=STEPS,
        return_logits=LOGIT_STEPS,
    )

    batch = encode(smol.tokenizer, PROMPTS, chat=True, max_context=8192)
    cache = BudgetedCache.from_profile(art.profile, model=smol.model)
    with torch.inference_mode():
        ref = smol.model.generate(
            **batch,
            past_key_values=cache,
            max_new_tokens=STEPS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=smol.tokenizer.pad_token_id,
        )
    new = ref.sequences[:, batch["input_ids"].shape[1] :].tolist()
    eos = smol.tokenizer.eos_token_id
    for i, r in enumerate(results):
        want = new[i][: new[i].index(eos) + 1] if eos in new[i] else new[i]
        assert r.token_ids == want, f"prompt {i}"
        live = min(LOGIT_STEPS, len(want))  # after EOS the two loops feed different tokens
        for step in range(live):
            np.testing.assert_allclose(ort_logits[step][i], ref.logits[step][i].numpy(), atol=1e-3)
    assert sum(len(r.token_ids) for r in results) > 3 * STEPS  # mostly long answers
