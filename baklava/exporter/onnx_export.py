"""Write the ONNX decoder and the tokenizer into an artifact being assembled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from baklava.errors import BaklavaError

MODEL_FILE, DATA_FILE, TOKENIZER_DIR = "model.onnx", "model.onnx.data", "tokenizer"


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def onnx_writer(lm, profile, progress: bool = True):
    """An ``extra`` callback for :func:`~baklava.exporter.artifact.write_artifact`."""

    def write(tmp: Path) -> dict:
        import onnx

        from baklava.exporter.graph_builder import build_decoder, save_model

        model = build_decoder(lm.model, profile, progress=progress)
        save_model(model, tmp / MODEL_FILE, DATA_FILE)
        try:
            onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        except onnx.checker.ValidationError as e:
            raise BaklavaError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from None
        lm.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        caps = {f"layer{i}": int(c.sum()) for i, c in enumerate(profile.capacities)}
        return {
            "graphs": {
                "decoder": {
                    "file": MODEL_FILE,
                    "data": DATA_FILE,
                    "tokenizer": TOKENIZER_DIR,
                    "custom_ops": {"domain": "baklava", "version": 1, "spec": "docs/ops.md"},
                    "cache_slots_per_layer": caps,
                    "dtype": "float32",
                }
            },
            "backends": ["onnxruntime"],
        }

    return write
