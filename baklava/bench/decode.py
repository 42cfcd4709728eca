"""Decode speed of an exported artifact in ONNX Runtime at a given context length.

The context is pydoc prose fed in prefill chunks (the graph compresses after each chunk), then
``steps`` greedy decode steps are timed. Artifacts given together are measured in one run.
"""

from __future__ import annotations

import time

import numpy as np

from baklava.profiles.calibration import default_text


def decode_speed(artifact_dir, *, context: int, steps: int = 16, chunk: int = 512) -> dict:
    from transformers import AutoTokenizer

    from baklava.backends.onnx_backend import load_decoder
    from baklava.exporter import read_artifact

    art = read_artifact(artifact_dir)
    decoder = load_decoder(art.path, art.manifest)
    tokenizer = AutoTokenizer.from_pretrained(art.path / art.manifest["graphs"]["decoder"]["tokenizer"])
    ids = tokenizer(default_text(), add_special_tokens=False, return_tensors="np")["input_ids"][:, :context]
    cache = decoder.new_cache(1)
    seen = np.zeros(1, dtype=np.int64)
    start = time.perf_counter()
    for lo in range(0, context, chunk):
        part = ids[:, lo : lo + chunk]
        positions = seen[:, None] + np.arange(part.shape[1])[None]
        logits = decoder.step(cache, part, positions, np.ones(part.shape, bool), seen)
        seen = seen + part.shape[1]
    prefill_s = time.perf_counter() - start
    token = logits[:, -1].argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        logits = decoder.step(cache, token, seen[:, None], np.ones((1, 1), bool), seen)
        token = logits[:, -1].argmax(-1)[:, None]
        seen = seen + 1
    decode_s = time.perf_counter() - start
    return {
        "artifact": str(artifact_dir),
        "budget": art.manifest["budget"]["spec"],
        "cache_slots": art.profile.total_tokens,
        "context": context,
        "prefill_s": round(prefill_s, 2),
        "decode_ms_per_token": round(1000 * decode_s / steps, 1),
        "decode_tokens_per_s": round(steps / decode_s, 2),
    }
