"""Write a Triton model repository for an exported artifact.

    REPO/
      baklava/
        config.pbtxt          Python backend, decoupled (token streaming), instance group,
                              parameters: artifact, device, kv_memory, max_batch,
                              prefill_chunk, chat_template, threads
        1/model.py            re-exports baklava.serving.triton_model.TritonPythonModel
        1/artifact/           copy of the artifact (profile.json, manifest.json)

The model weights are not copied: the instance loads them through the artifact's model spec
(an alias is fetched into the user cache on first use). Written atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from baklava.atomic import atomic_directory
from baklava.errors import BaklavaError
from baklava.exporter.artifact import MANIFEST_FILE, PLOT_FILE, read_artifact
from baklava.profiles.budget import parse_size

MODEL_NAME = "baklava"
ARTIFACT_IN_REPO = Path(MODEL_NAME, "1", "artifact")  # the artifact copy a repository serves

CONFIG_TEMPLATE = """\
name: "{name}"
backend: "python"
max_batch_size: 0

# Token streaming: one request may get many responses (gRPC streaming, HTTP generate_stream).
model_transaction_policy {{ decoupled: true }}

input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "context" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "num_tokens" data_type: TYPE_INT32 dims: [ 1 ] }}
]

instance_group [ {{ count: {instances} kind: {kind} }} ]

parameters {{ key: "artifact" value: {{ string_value: "artifact" }} }}
parameters {{ key: "device" value: {{ string_value: "{device}" }} }}
parameters {{ key: "kv_memory" value: {{ string_value: "{kv_memory}" }} }}
parameters {{ key: "max_batch" value: {{ string_value: "{max_batch}" }} }}
parameters {{ key: "prefill_chunk" value: {{ string_value: "{prefill_chunk}" }} }}
parameters {{ key: "chat_template" value: {{ string_value: "{chat}" }} }}
parameters {{ key: "threads" value: {{ string_value: "{threads}" }} }}
"""

MODEL_PY = '''"""Triton Python backend entry point for a BaKlaVa artifact (see baklava.serving.triton_model)."""

from baklava.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def write_repository(
    artifact_dir: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    instances: int = 1,
    device: str = "cpu",
    chat: bool = True,
    threads: int | None = None,
    kv_memory: str | None = None,
    max_batch: int | None = None,
    prefill_chunk: int = 8192,
    overwrite: bool = False,
) -> Path:
    """Create the model repository ``repo`` for ``artifact_dir``; returns ``repo``.

    Each instance serves from one engine whose pool has ``max_batch`` rows, or as many as
    ``kv_memory`` (a size like ``"40GiB"``) holds; neither: 8 rows on the CPU, 80% of the free GPU
    memory on CUDA.
    """
    art = read_artifact(artifact_dir)  # verifies manifest, profile checksum and sha256
    if instances < 1:
        raise BaklavaError("instances must be >= 1")
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise BaklavaError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if kv_memory is not None:
        parse_size(kv_memory)  # refuse a bad size now, not when the server loads the model
    if max_batch is not None and max_batch < 1:
        raise BaklavaError(f"max_batch must be >= 1, got {max_batch}")
    if prefill_chunk < 1:
        raise BaklavaError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    repo = Path(repo)
    if repo.exists() and not overwrite:
        raise BaklavaError(f"{repo} already exists; choose another repository path or pass --force")
    kind = "KIND_GPU" if device.startswith("cuda") else "KIND_CPU"
    threads = threads or max(1, (os.cpu_count() or 1) // instances)
    with atomic_directory(repo, overwrite=overwrite) as tmp:
        version = tmp / MODEL_NAME / "1"
        version.mkdir(parents=True)
        (tmp / MODEL_NAME / "config.pbtxt").write_text(
            CONFIG_TEMPLATE.format(
                name=MODEL_NAME,
                instances=instances,
                kind=kind,
                device=device,
                kv_memory=kv_memory or "",
                max_batch=max_batch or "",
                prefill_chunk=prefill_chunk,
                chat=str(chat).lower(),
                threads=threads,
            )
        )
        (version / "model.py").write_text(MODEL_PY)
        shutil.copytree(art.path, tmp / ARTIFACT_IN_REPO, ignore=shutil.ignore_patterns(PLOT_FILE))
    return repo


def is_repository(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a model repository (a subdirectory with config.pbtxt)."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() for p in path.glob("*/config.pbtxt"))


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def artifact_in(path: str | os.PathLike) -> Path:
    """The artifact of ``path``: itself, or the copy a model repository serves."""
    if is_repository(path) and not is_artifact(path):
        return Path(path) / ARTIFACT_IN_REPO
    return Path(path)


def repository_to_serve(
    path: str | os.PathLike, scratch: str | os.PathLike, *, instances: int, **engine
) -> Path:
    """The model repository that serves ``path``: an artifact gets one written under ``scratch``
    with ``engine`` (device, kv_memory, max_batch, prefill_chunk); a repository is served as it is
    and refuses engine settings its config.pbtxt already fixes."""
    if is_artifact(path):
        return write_repository(path, Path(scratch) / "repo", instances=instances, **engine)
    if is_repository(path):
        if engine.get("kv_memory") or engine.get("max_batch") or engine.get("device", "cpu") != "cpu":
            raise BaklavaError(
                f"{path} is a model repository: its config.pbtxt sets device and pool size "
                "(rewrite it with baklava-triton, or serve the artifact)"
            )
        return Path(path)
    raise BaklavaError(f"{path}: neither an artifact (manifest.json) nor a model repository (*/config.pbtxt)")


def pool_size(params: dict, device: str) -> tuple[int | None, int | None]:
    """``(kv_memory bytes, max_batch)`` of an instance's engine pool from the parameters written above:
    ``max_batch`` rows, or as many as ``kv_memory`` holds; neither: 8 rows on the CPU, 80% of the
    GPU memory free after loading the model on CUDA."""
    kv_memory = params.get("kv_memory", "")
    max_batch = params.get("max_batch", "")
    kv = parse_size(kv_memory) if kv_memory else None
    rows = int(max_batch) if max_batch else None
    if kv is None and rows is None:
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            kv = int(0.8 * free)
        else:
            rows = 8
    return kv, rows
