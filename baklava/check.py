"""Compare an artifact's backends on the same inputs, Polygraphy-style (``baklava-check``).

Every backend runs the same token ids: one prefill of ``context`` prompt tokens, then ``steps``
decode steps fed the *reference's* greedy tokens (teacher forcing, so one divergent token does
not change every later input). For each step the last position's logits are compared with the
reference's; after the last step, the positions each KV head kept.

Backends:

* ``reference`` - the PyTorch runtime on the CPU in float32 (per-head prefill, vectorized decode);
* ``onnxruntime`` - the exported ``model.onnx`` with its ``baklava`` ops (CPU);
* ``torch-cuda`` - the PyTorch runtime on a CUDA device in float32 with the Triton kernels
  (the decode-attention, cache-update and prefill-select kernels the TensorRT plugins will launch);
* ``tensorrt`` - ``DIR/model.engine`` (``baklava-export --engine``) with the baklava plugins;
  skipped, with the reason, where TensorRT, a GPU or the engine is missing.

A backend passes when every step's logits are within ``atol + rtol * max|reference logits|`` and
its greedy token equals the reference's at every step; the share of heads whose kept positions
equal the reference's is reported beside it (near-ties in the scores may legitimately flip).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from baklava.errors import BaklavaError

BACKENDS = ("reference", "onnxruntime", "torch-cuda", "tensorrt")


@dataclass
class Trace:
    """What one backend produced: last-position logits per step ``[V]``, and each head's kept
    positions after the last step, keyed ``(layer, head)``."""

    logits: list[np.ndarray]
    kept: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    fed: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    backend: str
    status: str  # "pass", "FAIL" or "skipped"
    reason: str = ""
    max_abs_diff: float | None = None
    tolerance: float | None = None
    argmax_agree: float | None = None
    heads_equal: float | None = None

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def _kept(positions: np.ndarray, fill: np.ndarray, capacities: np.ndarray) -> dict:
    """``{(layer, head): sorted positions}`` of row 0 from ``positions [L][C]``, ``fill [L][H]``."""
    out = {}
    for layer, caps in enumerate(capacities):
        offset = 0
        for head, cap in enumerate(caps):
            n = int(fill[layer][head])
            out[(layer, head)] = np.sort(np.asarray(positions[layer][offset : offset + n]))
            offset += int(cap)
    return out


def run_torch(model, profile, ids: np.ndarray, feed: list[int] | None = None, steps: int = 0) -> Trace:
    """The PyTorch runtime on the model's device (``ids [1, S]``). Decodes ``feed``, or, without
    it, ``steps`` greedy tokens (recorded in :attr:`Trace.fed`)."""
    from baklava.runtime import BudgetedCache
    from baklava.runtime.generate import decode_one_token, prefill

    device = next(model.parameters()).device
    cache = BudgetedCache.from_profile(profile, model=model)
    fed = []
    with torch.inference_mode():
        logits = [prefill(model, cache, torch.as_tensor(ids, device=device)).float().cpu().numpy()[0]]
        for i in range(len(feed) if feed is not None else steps):
            token = feed[i] if feed is not None else int(logits[-1].argmax())
            fed.append(token)
            step = decode_one_token(model, cache, torch.tensor([[token]], device=device))
            logits.append(step.float().cpu().numpy()[0])
    positions = [layer.positions[0].cpu().numpy() for layer in cache.layers]
    fill = [layer.fill[0].cpu().numpy() for layer in cache.layers]
    return Trace(logits, _kept(positions, fill, profile.capacities), fed)


def run_graph(decoder, artifact, ids: np.ndarray, feed: list[int]) -> Trace:
    """An exported graph's decoder (ONNX Runtime or TensorRT): prefill ``ids [1, S]``, decode ``feed``."""
    cache = decoder.new_cache(1)
    seen = np.zeros(1, dtype=np.int64)
    logits = [decoder.step(cache, ids, np.arange(ids.shape[1])[None], np.ones(ids.shape, bool), seen)[0, -1]]
    seen = seen + ids.shape[1]
    for token in feed:
        step = decoder.step(cache, np.array([[token]]), seen[:, None], np.ones((1, 1), bool), seen)
        logits.append(step[0, -1])
        seen = seen + 1
    state = decoder.state(cache)
    layers = range(decoder.num_layers)
    positions = [state[f"past.{layer}.position"][0] for layer in layers]
    fill = [state[f"past.{layer}.fill"][0] for layer in layers]
    return Trace(logits, _kept(positions, fill, artifact.profile.capacities))


def _tensorrt_unavailable(artifact) -> str:
    """Why the tensorrt backend cannot run here ("" if it can)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if "engine" not in artifact.manifest:
        return "the artifact has no engine (baklava-export --engine)"
    return ""


def compare(reference: Trace, other: Trace, name: str, *, atol: float, rtol: float) -> Verdict:
    """Verdict of ``other`` against ``reference`` (see the module docstring)."""
    diffs = [float(np.abs(a - b).max()) for a, b in zip(reference.logits, other.logits, strict=True)]
    scale = max(float(np.abs(a).max()) for a in reference.logits)
    agree = np.mean([a.argmax() == b.argmax() for a, b in zip(reference.logits, other.logits, strict=True)])
    same = [np.array_equal(v, other.kept.get(k)) for k, v in reference.kept.items()]
    tol = atol + rtol * scale
    ok = max(diffs) <= tol and agree == 1.0
    return Verdict(
        name,
        "pass" if ok else "FAIL",
        max_abs_diff=round(max(diffs), 6),
        tolerance=round(tol, 6),
        argmax_agree=float(agree),
        heads_equal=round(float(np.mean(same)), 4),
    )


def check(artifact, backends, *, context: int, steps: int, atol: float, rtol: float, text: str | None = None):
    """Run ``backends`` on the artifact's model and return ``(verdicts, reference_tokens)``."""
    from baklava.model_zoo import load_model
    from baklava.profiles.calibration import default_text

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise BaklavaError(f"unknown backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
    lm = load_model(artifact.model_spec, dtype=torch.float32, progress=False)
    ids = lm.tokenizer(text or default_text(), add_special_tokens=False, return_tensors="np")["input_ids"]
    if ids.shape[1] < context:
        raise BaklavaError(f"the text has {ids.shape[1]} tokens, fewer than --context {context}")
    ids = ids[:, :context]
    reference = run_torch(
        lm.model, artifact.profile, ids, steps=steps
    )  # greedy: the tokens every backend is fed
    feed = reference.fed
    evicted = np.mean([len(v) < context + steps for v in reference.kept.values()])
    verdicts = [Verdict("reference", "pass", reason=f"the oracle; {evicted:.0%} of heads evicted tokens")]
    for name in backends:
        if name == "reference":
            continue
        if name == "onnxruntime":
            if "decoder" not in artifact.manifest.get("graphs", {}):
                verdicts.append(Verdict(name, "skipped", reason="the artifact has no ONNX graph"))
                continue
            from baklava.backends.onnx_backend import load_decoder

            trace = run_graph(load_decoder(artifact.path, artifact.manifest), artifact, ids, feed)
        elif name == "torch-cuda":
            if not torch.cuda.is_available():
                verdicts.append(Verdict(name, "skipped", reason="no CUDA device"))
                continue
            trace = run_torch(lm.model.to("cuda"), artifact.profile, ids, feed)
            lm.model.to("cpu")
        else:  # tensorrt
            reason = _tensorrt_unavailable(artifact)
            if reason:
                verdicts.append(Verdict(name, "skipped", reason=reason))
                continue
            from baklava.backends.tensorrt_backend import TensorRTDecoder

            trace = run_graph(TensorRTDecoder(artifact.path, artifact.manifest), artifact, ids, feed)
        verdicts.append(compare(reference, trace, name, atol=atol, rtol=rtol))
    return verdicts, feed
