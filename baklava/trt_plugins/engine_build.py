"""Build ``DIR/model.engine``: the artifact's ONNX decoder, parsed by TensorRT with the baklava plugins.

Data flow: ``model.onnx`` (with ONNX-function bodies for ONNX Runtime) -> :func:`plugin_graph`
(the same nodes, function bodies dropped, ``plugin_namespace="baklava"`` added, so TensorRT's ONNX
parser maps each ``baklava`` node to the plugin of the same name instead of inlining the
function) -> TensorRT network -> one optimization profile over batch ``B`` and new tokens ``S``
-> serialized engine, written atomically, and an ``engine`` entry in the manifest (TensorRT
version, GPU, compute capability, precision, optimization-profile shapes, and the sha256 of the
budget profile whose capacities the plugins baked in), which the ``tensorrt`` runtime backend
checks before it loads anything.

Precision: the exported graph is float32, and a float32 engine is built as a *strongly typed*
network (types exactly as in the graph). ``fp16``/``bf16`` engines use TensorRT's weakly typed
precision flags (TensorRT 10); the plugins advertise float32, float16 and bfloat16 for their
cache and activations.

Nothing here runs without TensorRT; :func:`require_tensorrt` stops with one line instead, and
the ONNX artifact is never modified until the engine file is complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from baklava.atomic import write_bytes_atomic, write_text_atomic
from baklava.errors import BaklavaError
from baklava.exporter.artifact import MANIFEST_FILE, Artifact, _sha256
from baklava.exporter.ops.spec import DOMAIN, OPSET_VERSION

ENGINE_FILE = "model.engine"
PRECISIONS = ("fp32", "fp16", "bf16")
MIN_TENSORRT = (10, 11)  # the Python plugin API with ahead-of-time implementations


@dataclass(frozen=True)
class EngineShapes:
    """The optimization profile: ``(min, opt, max)`` batch rows and new tokens per step."""

    max_batch: int = 8
    max_tokens: int = 2048  # the longest prefill chunk
    opt_batch: int = 1

    def batch(self) -> tuple[int, int, int]:
        return (1, min(self.opt_batch, self.max_batch), self.max_batch)

    def tokens(self) -> tuple[int, int, int]:
        return (1, 1, self.max_tokens)  # tuned for decode steps; chunks up to max_tokens run too


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line :class:`BaklavaError` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BaklavaError(
            "TensorRT is not installed: engines need TensorRT >= 10.11 and an NVIDIA GPU "
            "(pip install tensorrt, or an NGC TensorRT container)"
        ) from None
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise BaklavaError(f"TensorRT {trt.__version__} is too old: the baklava plugins need >= 10.11")
    return trt


def plugin_graph(model):
    """A copy of the exported ``onnx.ModelProto`` whose ``baklava`` nodes resolve to plugins."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.functions[:]  # a function body would be inlined by the parser; the plugin replaces it
    for node in out.graph.node:
        if node.domain == DOMAIN:
            node.overload = ""
            node.attribute.extend(
                [
                    helper.make_attribute("plugin_namespace", DOMAIN),
                    helper.make_attribute("plugin_version", str(OPSET_VERSION)),
                ]
            )
    return out


def current_gpu(purpose: str) -> tuple[str, str]:
    """``(name, "major.minor")`` of the CUDA device an engine is built for or run on; a one-line
    :class:`BaklavaError` naming ``purpose`` where there is none."""
    import torch

    if not torch.cuda.is_available():
        raise BaklavaError(f"{purpose} needs a CUDA GPU; none is visible here")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _parse(trt, network, path: Path) -> None:
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse_from_file(str(path)):
        first = parser.get_error(0) if parser.num_errors else "unknown error"
        raise BaklavaError(f"TensorRT could not parse {path.name}: {first}")


def profile_bounds(dims, shapes: EngineShapes) -> tuple[tuple[int, ...], ...]:
    """``(min, opt, max)`` of one graph input: axis 0 is the batch, axis 1 of a ``[B, S]`` input
    the new tokens; static axes (cache slots, heads, head_dim) stay as they are."""
    batch, tokens = shapes.batch(), shapes.tokens()
    bounds = []
    for k in range(3):
        bound = list(dims)
        if bound and bound[0] == -1:
            bound[0] = batch[k]
        if len(bound) > 1 and bound[1] == -1:
            bound[1] = tokens[k]
        if -1 in bound:
            raise BaklavaError(f"input with dims {tuple(dims)} has a dynamic axis past the batch and tokens")
        bounds.append(tuple(bound))
    return tuple(bounds)


def _profile(builder, network, shapes: EngineShapes):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, *profile_bounds(list(tensor.shape), shapes))
    return profile


def build_engine(artifact: Artifact, *, precision: str = "fp32", shapes: EngineShapes | None = None) -> dict:
    """Build and write ``DIR/model.engine``; update the manifest; return its ``engine`` entry."""
    if precision not in PRECISIONS:
        raise BaklavaError(f"unknown engine precision {precision!r}; one of {', '.join(PRECISIONS)}")
    graph = (artifact.manifest.get("graphs") or {}).get("decoder")
    if not graph:
        raise BaklavaError(f"{artifact.path}: no ONNX graph to build an engine from (export with --onnx)")
    trt = require_tensorrt()
    gpu, capability = current_gpu("building a TensorRT engine")
    shapes = shapes or EngineShapes()

    import onnx

    from baklava.trt_plugins.tensorrt_plugins import register

    register()
    started = time.perf_counter()
    source = artifact.path / graph["file"]
    staged = artifact.path / f".{ENGINE_FILE}.plugins.onnx"  # beside the weights it references
    try:
        onnx.save_model(plugin_graph(onnx.load(str(source), load_external_data=False)), str(staged))
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if precision == "fp32":
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        _parse(trt, network, staged)
    finally:
        staged.unlink(missing_ok=True)
    config = builder.create_builder_config()
    if precision != "fp32":
        flag = getattr(trt.BuilderFlag, precision.upper(), None)  # FP16 / BF16
        if flag is None:
            raise BaklavaError(
                f"TensorRT {trt.__version__} has no weakly typed {precision} mode; build an fp32 engine"
            )
        config.set_flag(flag)
    config.add_optimization_profile(_profile(builder, network, shapes))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BaklavaError("TensorRT failed to build the engine (see its log above)")
    engine_path = artifact.path / ENGINE_FILE
    write_bytes_atomic(engine_path, bytes(serialized))
    entry = {
        "file": ENGINE_FILE,
        "sha256": _sha256(engine_path),
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "compute_capability": capability,
        "precision": precision,
        "budget_profile_sha256": artifact.manifest["profile"]["sha256"],  # the capacities baked in
        "shapes": {"batch": list(shapes.batch()), "tokens": list(shapes.tokens())},  # min, opt, max
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    manifest = dict(artifact.manifest)
    manifest["engine"] = entry
    manifest["backends"] = sorted({*manifest.get("backends", []), "tensorrt"})
    write_text_atomic(artifact.path / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    artifact.manifest.update(manifest)
    return entry


def build_engine_after_export(artifact: Artifact, precision: str, shapes: EngineShapes) -> dict:
    """:func:`build_engine` for ``baklava-export --engine``: an error says the ONNX artifact is whole."""
    try:
        return build_engine(artifact, precision=precision, shapes=shapes)
    except BaklavaError as e:
        raise BaklavaError(f"--engine: {e} (the ONNX artifact in {artifact.path} is complete)") from None
