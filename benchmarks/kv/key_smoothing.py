"""Quantization error of keys with and without their head mean subtracted (SageAttention's smoothing).

Attention is blind to what every key of a head shares (``q . (k - mu)`` shifts all of a query's
logits by ``q . mu``), so the error that matters is the quantized key's error relative to the
spread of ``k - mu``. Run on the CPU:

    python benchmarks/kv/key_smoothing.py qwen2.5-coder-0.5b      # or smollm2-135m, or a .gguf path
"""

import sys

import torch
from transformers import DynamicCache

from baklava import kv_format
from baklava.model_zoo import load_model
from baklava.runtime.cache_keyword import forward_cache


def main(spec: str, tokens: int = 1024) -> None:
    lm = load_model(spec, dtype=torch.float32, progress=False)
    text = open("README.md").read()
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    cache = DynamicCache()
    with torch.no_grad():
        lm.model(input_ids=ids, **forward_cache(lm.model, cache))
    for name in ("int8", "int4"):
        fmt = kv_format.parse(name)
        for centered in (False, True):
            errors = []
            for layer in cache.layers:
                k = layer.keys[0]  # [H, T, D], after RoPE: what the cache stores
                mu = k.mean(1, keepdim=True)  # each head's mean key over the prompt
                x = k - mu if centered else k
                errors.append(float((kv_format.round_trip(x, fmt) - x).norm() / (k - mu).norm()))
            label = "k - mean" if centered else "k       "
            mean = sum(errors) / len(errors)
            print(
                f"{name} {label} error / spread of k - mean: mean {mean:.4f}, worst layer {max(errors):.4f}"
            )


if __name__ == "__main__":
    main(sys.argv[1])
