"""ONNX Runtime backend: run an exported decoder with persistent packed-cache buffers.

The cache lives in two sets of ``OrtValue`` buffers allocated once per generation; each step
reads one set and writes the other through I/O binding (double buffering), so no cache tensor
is reallocated per token. The loop mirrors :func:`baklava.runtime.generate.generate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baklava.errors import BaklavaError
from baklava.runtime.generate import Generation, encode

_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


@dataclass
class CacheBuffers:
    """Two sets of past/present buffers per cache tensor; ``current`` is what the next step reads."""

    sets: tuple[dict, dict]
    current: int = 0

    def read(self) -> dict:
        return self.sets[self.current]

    def write(self) -> dict:
        return self.sets[1 - self.current]

    def swap(self) -> None:
        self.current = 1 - self.current

    def nbytes(self, which: str = "kv") -> int:
        """Bytes of one set (``kv``: keys and values only)."""
        fields = (".key", ".value") if which == "kv" else ("",)
        return sum(v.numpy().nbytes for k, v in self.read().items() if k.endswith(fields))


class OnnxDecoder:
    """An exported ``model.onnx`` with its ``baklava`` ops, on the CPU execution provider."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BaklavaError("onnxruntime is not installed: pip install 'baklava[onnx]'") from None
        self._ort = ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.num_layers = len({i.name.split(".")[1] for i in self.past})

    def new_cache(self, batch: int) -> CacheBuffers:
        sets = ({}, {})
        for info in self.past:
            shape = [batch if isinstance(s, str) else s for s in info.shape]
            dtype = _DTYPES[info.type]
            fill = -1 if info.name.endswith(".position") else 0
            for s in sets:
                s[info.name] = self._ort.OrtValue.ortvalue_from_numpy(np.full(shape, fill, dtype=dtype))
        return CacheBuffers(sets)

    def state(self, cache: CacheBuffers) -> dict[str, np.ndarray]:
        """The cache tensors (``past.*`` names) as numpy arrays."""
        return {name: value.numpy() for name, value in cache.read().items()}

    def step(self, cache: CacheBuffers, input_ids, position_ids, token_mask, seen) -> np.ndarray:
        """One prefill chunk or decode step; returns logits ``[B, S, V]`` and advances ``cache``."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("token_mask", np.ascontiguousarray(token_mask, dtype=np.bool_))
        binding.bind_cpu_input("seen", np.ascontiguousarray(seen, dtype=np.int64))
        for name, value in cache.read().items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # first: get_outputs() follows the binding order
        for name, value in cache.write().items():
            binding.bind_ortvalue_output(name.replace("past.", "present.", 1), value)
        self.session.run_with_iobinding(binding)
        cache.swap()
        return binding.get_outputs()[0].numpy()


def generate_onnx(
    decoder: OnnxDecoder,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    max_context: int = 1 << 30,
    return_logits: int = 0,
    stats: dict | None = None,
    chunk: int | None = None,
):
    """Greedy-decode ``prompts`` as one left-padded batch; returns :class:`Generation` s.

    ``decoder`` is an :class:`OnnxDecoder` or a
    :class:`~baklava.backends.tensorrt_backend.TensorRTDecoder` (same step interface). The prompt
    is prefilled in steps of at most ``chunk`` tokens (all at once by default); the cache ops
    compress after every step. With ``return_logits=n`` also returns the logits of the first
    ``n`` generated positions; ``stats`` receives ``kv_bytes``, measured from the cache buffers.
    """
    batch = encode(tokenizer, prompts, chat=chat, max_context=max_context)
    mask = batch["attention_mask"].numpy().astype(bool)  # [B, S]
    ids = batch["input_ids"].numpy()
    rows = ids.shape[0]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    seen = np.zeros(rows, dtype=np.int64)
    cache = decoder.new_cache(rows)
    step = chunk or ids.shape[1]
    for s0 in range(0, ids.shape[1], step):
        part = slice(s0, s0 + step)
        logits = decoder.step(cache, ids[:, part], positions[:, part], mask[:, part], seen)[:, -1]  # [B, V]
        seen = seen + mask[:, part].sum(1)
    out, kept = [], []
    for _ in range(max_new_tokens):
        if len(kept) < return_logits:
            kept.append(logits.copy())
        token = logits.argmax(-1)  # [B]
        out.append(token)
        logits = decoder.step(cache, token[:, None], seen[:, None], np.ones((rows, 1), bool), seen)[:, -1]
        seen = seen + 1
    if stats is not None:
        stats["kv_bytes"] = cache.nbytes("kv")
    tokens = np.stack(out, axis=1)  # [B, max_new_tokens]
    results = []
    for i, prompt in enumerate(prompts):
        row = tokens[i].tolist()
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        results.append(
            Generation(prompt, tokenizer.decode(row, skip_special_tokens=True), row, int(mask[i].sum()))
        )
    return (results, kept) if return_logits else results


def load_decoder(artifact_dir: str | os.PathLike, manifest: dict, threads: int | None = None) -> OnnxDecoder:
    graph = (manifest.get("graphs") or {}).get("decoder")
    if not graph:
        raise BaklavaError(f"{artifact_dir}: this artifact has no ONNX graph (export it again with --onnx)")
    return OnnxDecoder(Path(artifact_dir) / graph["file"], threads=threads)
