"""The exported SmolLM2 graph in ONNX Runtime against the PyTorch reference, token for token."""

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnx extra not installed")
onnx = pytest.importorskip("onnx")

from baklava.backends.onnx_backend import generate_onnx, load_decoder  # noqa: E402
from baklava.exporter import read_artifact  # noqa: E402
from baklava.runtime import BudgetedCache  # noqa: E402
from baklava.runtime.cache_keyword import generate_cache  # noqa: E402
from baklava.runtime.generate import encode  # noqa: E402
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
            **generate_cache(smol.model, cache),
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


def test_baklava_check_compares_backends_on_an_evicting_artifact(smol, tmp_path, capsys):
    """``baklava-check`` on an artifact whose heads all evict (32 slots per head, 192 prompt
    tokens): ONNX Runtime passes against the reference with every head keeping the same tokens;
    backends that cannot run here are skipped with their reason, and the exit status is 0."""
    from baklava.check import check
    from baklava.cli import check_main

    # cosine scores: the retrieval scorer gives a few heads more than the 192-token context
    out = export_smol(tmp_path / "smol-32", "32", "--scorer", "cosine")
    verdicts, fed = check(
        read_artifact(out),
        ["onnxruntime", "torch-cuda", "tensorrt"],
        context=192,
        steps=4,
        atol=1e-3,
        rtol=1e-4,
    )
    by = {v.backend: v for v in verdicts}
    assert len(fed) == 4 and "100% of heads evicted" in by["reference"].reason
    assert by["onnxruntime"].status == "pass" and by["onnxruntime"].heads_equal == 1.0
    assert by["onnxruntime"].max_abs_diff < 1e-3 and by["onnxruntime"].argmax_agree == 1.0
    if importlib.util.find_spec("tensorrt") is None:
        assert by["tensorrt"].status == "skipped" and by["tensorrt"].reason == "TensorRT is not installed"
    if not torch.cuda.is_available():
        assert by["torch-cuda"].status == "skipped"
    check_main(
        [str(out), "--context", "64", "--steps", "2", "--backends", "onnxruntime", "--json"]
    )  # no exit: 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and '"status": "pass"' in rows[1]
    with pytest.raises(SystemExit) as exit_info:
        check_main([str(out), "--backends", "onnxruntime,cuda"])
    assert exit_info.value.code == 2  # unknown backend: one line, no run


def test_check_fails_a_backend_that_drifts():
    from baklava.check import Trace, compare

    ref = Trace([np.array([0.0, 2.0, 1.0]), np.array([3.0, 0.0, 1.0])], {(0, 0): np.array([1, 2])})
    close = Trace([np.array([0.0, 2.0005, 1.0]), np.array([3.0, 0.0, 1.0])], {(0, 0): np.array([1, 2])})
    assert compare(ref, close, "x", atol=1e-3, rtol=0).status == "pass"
    flipped = Trace([np.array([0.0, 2.0, 1.0]), np.array([0.0, 3.0, 1.0])], {(0, 0): np.array([1, 3])})
    verdict = compare(ref, flipped, "x", atol=10.0, rtol=0)  # within tolerance, but a different token
    assert verdict.status == "FAIL" and verdict.argmax_agree == 0.5 and verdict.heads_equal == 0.0
    assert compare(ref, close, "x", atol=1e-5, rtol=0).status == "FAIL"
