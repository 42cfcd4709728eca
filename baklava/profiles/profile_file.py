"""The BudgetProfile file: the single source of truth for exporter, plugins and runtime.

A versioned JSON document::

    {
      "schema_version": 1,
      "model":      {name, architecture, num_layers, num_q_heads, num_kv_heads, head_dim,
                     max_context, fingerprint},
      "scores":     {method, kv_head [L][H_kv], layer [L], raw {...}},
      "allocation": {method, params, budget, total_tokens, reference_context, min_cap, search}
                    | null,
      "capacities": [L][H_kv] ints | null,
      "eviction":   {sink, window, policy, obs_window, pool_kernel},
      "created": ISO date, "baklava_version": str,
      "checksum": sha256 of the canonical JSON of everything else
    }

Written atomically; :meth:`BudgetProfile.load` rejects a wrong schema, a bad checksum or a
profile made for another model with one clear line (:class:`~baklava.errors.ProfileError`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from baklava import __version__
from baklava.atomic import write_text_atomic
from baklava.errors import ProfileError
from baklava.eviction import EvictionConfig
from baklava.profiles.head_scores import HeadScores

SCHEMA_VERSION = 1
_FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_fingerprint(config) -> str:
    """sha256 (first 16 hex) of the architecture-defining fields of a transformers config."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    picked = {k: d.get(k) for k in _FINGERPRINT_KEYS}
    if picked.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
        picked["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return hashlib.sha256(canonical_json(picked).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelInfo:
    """Shape and identity of the model a profile belongs to."""

    name: str
    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    fingerprint: str

    @classmethod
    def from_config(cls, config, name: str) -> ModelInfo:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            name=name,
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            num_q_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            max_context=config.max_position_embeddings,
            fingerprint=config_fingerprint(config),
        )


@dataclass
class BudgetProfile:
    """Scores, allocation and eviction settings for one model.

    ``capacities`` is ``None`` for a scores-only profile (``baklava-profile`` without ``--budget``).
    """

    model: ModelInfo
    scores: HeadScores
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    capacities: np.ndarray | None = None
    allocation: dict | None = None
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    baklava_version: str = __version__

    def __post_init__(self) -> None:
        shape = (self.model.num_layers, self.model.num_kv_heads)
        if self.scores.shape != shape:
            raise ProfileError(f"profile scores have shape {self.scores.shape}, the model needs {shape}")
        if self.capacities is not None:
            self.capacities = np.asarray(self.capacities, dtype=np.int64)
            if self.capacities.shape != shape:
                raise ProfileError(
                    f"profile capacities have shape {self.capacities.shape}, the model needs {shape}"
                )
            if (self.capacities < 1).any():
                raise ProfileError("profile capacities must all be >= 1")

    # ------------------------------------------------------------------ budgets
    @property
    def total_tokens(self) -> int:
        self.require_capacities()
        return int(self.capacities.sum())

    def kv_bytes(self, batch: int = 1, dtype_bytes: float = 2) -> int:
        """Bytes of the packed K and V buffers: ``sum(cap) * 2 * head_dim * dtype_bytes * batch``
        (``dtype_bytes`` per channel, a quantized format's scales included)."""
        return round(self.total_tokens * 2 * self.model.head_dim * dtype_bytes * batch)

    @property
    def kv_format(self) -> str:
        """The KV storage format the budget was allocated for (``--kv-dtype``; ``auto`` = the
        model's dtype), see :mod:`baklava.kv_format`."""
        return (self.allocation or {}).get("kv_dtype", "auto")

    def require_capacities(self) -> np.ndarray:
        """The ``[L, H_kv]`` capacities; :class:`ProfileError` for a profile that has scores only."""
        if self.capacities is None:
            raise ProfileError(
                "this profile has scores but no capacities; allocate a budget first (--budget)"
            )
        return self.capacities

    def capacities_for(self, config) -> np.ndarray:
        """:meth:`require_capacities`, after checking the profile was made for a model of ``config``
        (a transformers config) - what a runtime asks before it builds a cache."""
        caps = self.require_capacities()
        self.check_model(config_fingerprint(config))
        return caps

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        body = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model.__dict__.copy(),
            "scores": {
                "method": self.scores.method,
                "kv_head": np.round(self.scores.kv_head, 8).tolist(),
                "layer": np.round(self.scores.layer, 8).tolist(),
                "raw": self.scores.raw,
            },
            "allocation": self.allocation,
            "capacities": None if self.capacities is None else self.capacities.tolist(),
            "eviction": self.eviction.to_dict(),
            "created": self.created,
            "baklava_version": self.baklava_version,
        }
        body["checksum"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
        return body

    @classmethod
    def from_dict(cls, d: dict, source: str = "profile") -> BudgetProfile:
        if not isinstance(d, dict):
            raise ProfileError(f"{source}: not a BaKlaVa profile (top level is not an object)")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileError(
                f"{source}: schema version {version!r}, this baklava reads version {SCHEMA_VERSION}"
            )
        body = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != hashlib.sha256(canonical_json(body).encode()).hexdigest():
            raise ProfileError(f"{source}: checksum mismatch (file corrupted or edited by hand)")
        try:
            scores = d["scores"]
            return cls(
                model=ModelInfo(**d["model"]),
                scores=HeadScores(
                    scores["kv_head"], scores["layer"], scores["method"], scores.get("raw", {})
                ),
                eviction=EvictionConfig(**d["eviction"]),
                capacities=None if d["capacities"] is None else np.asarray(d["capacities"]),
                allocation=d["allocation"],
                created=d["created"],
                baklava_version=d["baklava_version"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{source}: malformed profile ({e})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename); returns the path."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_fingerprint: str | None = None) -> BudgetProfile:
        """Read and verify a profile; with ``expect_fingerprint`` also check it belongs to that model."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"profile not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"{path}: cannot read profile ({e})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        profile = cls.from_dict(d, source=str(path))
        if expect_fingerprint is not None:
            profile.check_model(expect_fingerprint, source=str(path))
        return profile

    def check_model(self, fingerprint: str, source: str = "profile") -> None:
        if fingerprint != self.model.fingerprint:
            raise ProfileError(
                f"{source}: made for model {self.model.name!r} (fingerprint {self.model.fingerprint}), "
                f"not for this model (fingerprint {fingerprint})"
            )
