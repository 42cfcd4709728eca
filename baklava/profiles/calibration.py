"""Calibration text: long English prose, deterministic, available offline.

The default is the Python documentation topics that ship with the standard library
(``pydoc_data.topics``, ~465k characters), concatenated in sorted key order. ``--calibration FILE``
takes a ``.txt`` file (used whole) or a ``.jsonl`` file (one ``{"text": ...}`` per line).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from baklava.errors import BaklavaError


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def read_text(path: str | Path | None) -> tuple[str, str]:
    """Return ``(text, description)`` for a calibration file, or the default prose for ``None``."""
    if path is None:
        return default_text(), "pydoc_data.topics"
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BaklavaError(f"calibration file {path}: cannot read ({e})") from None
    if path.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                parts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BaklavaError(
                    f'calibration file {path}:{i}: expected {{"text": ...}} per line'
                ) from None
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise BaklavaError(f"calibration file {path} is empty")
    return raw, str(path)


@dataclass
class CalibrationSet:
    """Token windows cut from one text: profiling samples first, held-out search samples after."""

    samples: list[torch.Tensor]  # each [seq_len] int64
    heldout: list[torch.Tensor]  # each [heldout_len] int64, disjoint from samples
    description: str
    sha256: str

    def to_dict(self) -> dict:
        return {
            "source": self.description,
            "sha256": self.sha256,
            "samples": len(self.samples),
            "seq_len": int(self.samples[0].numel()) if self.samples else 0,
            "heldout": len(self.heldout),
        }


def build(
    tokenizer,
    text: str,
    description: str,
    *,
    num_samples: int,
    seq_len: int,
    num_heldout: int = 0,
    heldout_len: int = 0,
) -> CalibrationSet:
    """Cut ``num_samples`` windows of ``seq_len`` tokens, then ``num_heldout`` of ``heldout_len``.

    Raises :class:`BaklavaError` when the text is too short.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    need = num_samples * seq_len + num_heldout * heldout_len
    if ids.numel() < need:
        raise BaklavaError(
            f"calibration text ({description}) has {ids.numel()} tokens, {need} needed "
            f"({num_samples} x {seq_len} + {num_heldout} x {heldout_len}); use fewer or shorter samples"
        )
    samples = [ids[i * seq_len : (i + 1) * seq_len].clone() for i in range(num_samples)]
    start = ids.numel() - num_heldout * heldout_len  # held-out windows come from the end of the text
    heldout = [
        ids[start + i * heldout_len : start + (i + 1) * heldout_len].clone() for i in range(num_heldout)
    ]
    return CalibrationSet(samples, heldout, description, hashlib.sha256(text.encode()).hexdigest()[:16])
