"""TensorRT backend: run ``DIR/model.engine`` with the packed cache resident in GPU memory.

The cache is allocated once per generation (one set of device buffers, no double buffering):
each ``past.*`` tensor is bound by address as the engine's input *and* as the matching
``present.*`` output, which the ``BudgetedCacheUpdate`` plugin declares aliased to its input, so
a step updates the cache in place and moves no cache bytes. The step interface is the ONNX
Runtime decoder's (:class:`~baklava.backends.onnx_backend.OnnxDecoder`), so the same greedy loop
(:func:`~baklava.backends.onnx_backend.generate_onnx`) drives both.

Before anything is loaded, :func:`check_engine` compares the manifest's ``engine`` entry with this
TensorRT, this GPU and the requested batch and chunk, and stops with one line if they differ
(a serialized engine only runs on the TensorRT version and GPU it was built for).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baklava.errors import BaklavaError


def check_engine(
    entry: dict | None, *, tensorrt_version: str, gpu: str, capability: str, budget_profile_sha256: str
) -> None:
    """Raise a one-line :class:`BaklavaError` if the engine cannot run with this TensorRT and GPU,
    or holds the capacities of another budget profile than the artifact's."""
    if not entry:
        raise BaklavaError("this artifact has no TensorRT engine (build one: baklava-export ... --engine)")
    if entry["budget_profile_sha256"] != budget_profile_sha256:
        raise BaklavaError("the engine was built for another budget profile than profile.json: rebuild it")
    if entry["tensorrt"] != tensorrt_version:
        raise BaklavaError(
            f"the engine was built with TensorRT {entry['tensorrt']}, this is {tensorrt_version}: rebuild it"
        )
    if entry["compute_capability"] != capability or entry["gpu"] != gpu:
        raise BaklavaError(
            f"the engine was built for {entry['gpu']} (sm {entry['compute_capability']}), "
            f"this GPU is {gpu} (sm {capability}): rebuild it here"
        )


def check_shapes(entry: dict, *, batch: int | None = None, tokens: int | None = None) -> None:
    """Raise a one-line :class:`BaklavaError` if ``batch`` rows or ``tokens`` per step exceed the
    engine's optimization profile."""
    max_batch, max_tokens = entry["shapes"]["batch"][2], entry["shapes"]["tokens"][2]
    if batch is not None and batch > max_batch:
        raise BaklavaError(f"batch {batch} exceeds the engine's profile (at most {max_batch} sequences)")
    if tokens is not None and tokens > max_tokens:
        raise BaklavaError(f"{tokens} tokens in one step exceed the engine's profile (at most {max_tokens})")


@dataclass
class DeviceCache:
    """The packed cache of every layer as device tensors, keyed by the engine's ``past.*`` names."""

    tensors: dict

    def nbytes(self, which: str = "kv") -> int:
        fields = (".key", ".value") if which == "kv" else ("",)
        return sum(t.numel() * t.element_size() for k, t in self.tensors.items() if k.endswith(fields))

    def state(self) -> dict[str, np.ndarray]:
        return {name: t.cpu().numpy() for name, t in self.tensors.items()}


class TensorRTDecoder:
    """A built ``model.engine`` (see :mod:`baklava.trt_plugins.engine_build`) on the current CUDA device."""

    def __init__(self, artifact_dir: str | os.PathLike, manifest: dict):
        import torch

        from baklava.trt_plugins.engine_build import current_gpu, require_tensorrt

        trt = require_tensorrt()
        gpu, capability = current_gpu("the tensorrt backend")
        self.entry = manifest.get("engine")
        check_engine(
            self.entry,
            tensorrt_version=trt.__version__,
            gpu=gpu,
            capability=capability,
            budget_profile_sha256=manifest["profile"]["sha256"],
        )
        from baklava.trt_plugins.tensorrt_plugins import register

        register()  # the kernels are in the engine; the creators make deserialization self-checking
        path = Path(artifact_dir) / self.entry["file"]
        if not path.is_file():
            raise BaklavaError(f"{path}: engine file missing")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != self.entry["sha256"]:
            raise BaklavaError(f"{path}: does not match the manifest's sha256 (modified or partly copied)")
        self._torch = torch
        self._dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
        }  # TensorRT -> torch, for the buffers this backend allocates
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise BaklavaError(f"{path}: TensorRT could not deserialize the engine (see its log)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.past = [n for n in names if n.startswith("past.")]
        self.num_layers = len({n.split(".")[1] for n in self.past})
        self.max_tokens = self.entry["shapes"]["tokens"][2]

    def _dtype(self, name: str):
        return self._dtypes[self.engine.get_tensor_dtype(name)]

    def new_cache(self, batch: int) -> DeviceCache:
        check_shapes(self.entry, batch=batch)
        tensors = {}
        for name in self.past:
            shape = [batch if d == -1 else d for d in self.engine.get_tensor_shape(name)]
            fill = -1 if name.endswith(".position") else 0
            tensors[name] = self._torch.full(shape, fill, dtype=self._dtype(name), device="cuda")
        return DeviceCache(tensors)

    def state(self, cache: DeviceCache) -> dict[str, np.ndarray]:
        return cache.state()

    def step(self, cache: DeviceCache, input_ids, position_ids, token_mask, seen) -> np.ndarray:
        """One prefill chunk or decode step; returns logits ``[B, S, V]`` (float32, host)."""
        torch = self._torch
        check_shapes(self.entry, batch=np.shape(input_ids)[0], tokens=np.shape(input_ids)[1])
        feeds = {
            "input_ids": torch.as_tensor(np.asarray(input_ids, np.int64), device="cuda"),
            "position_ids": torch.as_tensor(np.asarray(position_ids, np.int64), device="cuda"),
            "token_mask": torch.as_tensor(np.asarray(token_mask, np.bool_), device="cuda"),
            "seen": torch.as_tensor(np.asarray(seen, np.int64), device="cuda"),
        }
        ctx = self.context
        for name, t in (*feeds.items(), *cache.tensors.items()):
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in cache.tensors.items():  # in place: present.* aliases past.*
            ctx.set_tensor_address(name.replace("past.", "present.", 1), t.data_ptr())
        logits = torch.empty(
            tuple(ctx.get_tensor_shape("logits")), dtype=self._dtype("logits"), device="cuda"
        )
        ctx.set_tensor_address("logits", logits.data_ptr())
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BaklavaError("TensorRT failed to run the step (see its log)")
        stream.synchronize()
        return logits.float().cpu().numpy()
