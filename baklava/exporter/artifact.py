"""The exported artifact directory: ``profile.json``, ``manifest.json``, ``profile.png``, ONNX graph.

``manifest.json`` says how to run the artifact: which model (the ``--model`` spec that reloads
it, and its config fingerprint), the profile's sha256, the KV memory it will use, and which
graph files exist (``model.onnx`` + ``model.onnx.data`` with the ``baklava`` custom ops, and the
tokenizer, unless exported with ``--no-onnx``).

The directory is assembled in a temporary sibling and renamed into place, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from baklava import __version__
from baklava.atomic import atomic_directory
from baklava.errors import BaklavaError, ProfileError
from baklava.profiles.profile_file import BudgetProfile

MANIFEST_VERSION = 1
PROFILE_FILE = "profile.json"
MANIFEST_FILE = "manifest.json"
PLOT_FILE = "profile.png"


@dataclass
class Artifact:
    path: Path
    manifest: dict
    profile: BudgetProfile

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_artifact(
    out: str | os.PathLike,
    profile: BudgetProfile,
    *,
    model_spec: str,
    plot: bool = True,
    overwrite: bool = False,
    extra=None,
) -> Artifact:
    """Write the artifact directory atomically; raise :class:`BaklavaError` if it cannot.

    ``extra(tmp_dir) -> dict`` may write more files (the ONNX graph, the tokenizer) and returns
    manifest entries to merge (``graphs``, ``backends``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BaklavaError(f"{out} already exists; choose another --out or pass --force")
    profile.require_capacities()
    alloc = profile.allocation or {}
    dtype_bytes = alloc.get("dtype_bytes", 2)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            profile.save(tmp / PROFILE_FILE)
            if plot:
                from baklava.profiles.plot import plot_profile

                plot_profile(profile, tmp / PLOT_FILE)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "baklava_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "model": {
                    "spec": model_spec,
                    "name": profile.model.name,
                    "architecture": profile.model.architecture,
                    "fingerprint": profile.model.fingerprint,
                },
                "profile": {"file": PROFILE_FILE, "sha256": _sha256(tmp / PROFILE_FILE)},
                "budget": {
                    "spec": alloc.get("budget"),
                    "method": alloc.get("method"),
                    "total_tokens": profile.total_tokens,
                    "fraction": alloc.get("fraction"),
                    "reference_context": alloc.get("reference_context"),
                    "kv_bytes_per_sequence": profile.kv_bytes(1, dtype_bytes),
                    "kv_dtype_bytes": dtype_bytes,
                    "kv_dtype": profile.kv_format,
                },
                "graphs": {},
                "backends": ["torch"],
            }
            if extra is not None:
                added = extra(tmp)
                manifest["graphs"].update(added.get("graphs", {}))
                manifest["backends"] += added.get("backends", [])
            if not manifest["graphs"]:
                manifest["note"] = "No ONNX graph (exported with --no-onnx or without the onnx extra)."
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    except PermissionError as e:
        raise BaklavaError(f"cannot write {out}: {e.strerror}") from None
    except OSError as e:
        raise BaklavaError(f"cannot write {out}: {e.strerror or e}") from None
    return Artifact(out, manifest, profile)


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Load and verify an artifact directory (manifest, profile checksum and sha256)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BaklavaError(
            f"{path}: not a BaKlaVa artifact (no {MANIFEST_FILE}; create one with baklava-export)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        version = manifest["manifest_version"]
        profile_name = manifest["profile"]["file"]
        expected = manifest["profile"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BaklavaError(f"{manifest_path}: malformed manifest") from None
    if version != MANIFEST_VERSION:
        raise BaklavaError(
            f"{manifest_path}: manifest version {version}, this baklava reads {MANIFEST_VERSION}"
        )
    profile_path = path / profile_name
    if not profile_path.is_file():
        raise ProfileError(f"{profile_path}: profile missing from artifact")
    if _sha256(profile_path) != expected:
        raise ProfileError(f"{profile_path}: does not match the manifest's sha256 (artifact modified)")
    profile = BudgetProfile.load(profile_path, expect_fingerprint=manifest["model"]["fingerprint"])
    return Artifact(path, manifest, profile)
