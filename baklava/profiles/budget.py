"""Budget forms and their resolution to a total number of cached tokens.

Three forms are accepted, all meaning "how many KV tokens the whole model may keep":

* a fraction in ``(0, 1]`` (``"0.3"``): that share of the full cache at the reference context,
  i.e. ``total = round(fraction * context * L * H_kv)``;
* an integer (``"512"``): that many tokens per KV head on average, ``total = n * L * H_kv``;
* a memory size (``"2GiB"``, ``"512MB"``): the KV bytes of a batch, so
  ``total = bytes // (batch * 2 * head_dim * dtype_bytes)``.

``"1.0"`` is a fraction (the full cache) while ``"1"`` is one token per head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from baklava.errors import BudgetError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget.

    Attributes
    ----------
    kind : {"fraction", "tokens", "bytes"}
    value : float
        The fraction, tokens per head, or bytes.
    text : str
        What the user typed, kept for the profile file.
    """

    kind: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str | float | int) -> Budget:
        """Parse ``"0.3"``, ``"512"`` or ``"2GiB"``; raise :class:`BudgetError` otherwise."""
        raw = str(text).strip()
        if isinstance(text, int) and not isinstance(text, bool):
            return cls._tokens(int(text), raw)
        m = _SIZE_RE.match(raw)
        if m:
            unit = m.group(2).lower()
            if unit not in _UNITS:
                raise BudgetError(
                    f"budget {raw!r}: unknown unit {m.group(2)!r} (use B, KB, MB, GB, KiB, MiB, GiB)"
                )
            nbytes = float(m.group(1)) * _UNITS[unit]
            if nbytes <= 0:
                raise BudgetError(f"budget {raw!r}: memory size must be > 0")
            return cls("bytes", nbytes, raw)
        if re.fullmatch(r"[0-9]+", raw):
            return cls._tokens(int(raw), raw)
        try:
            value = float(raw)
        except ValueError:
            raise BudgetError(
                f"budget {raw!r} is not a fraction in (0, 1], an integer number of tokens per head, "
                "or a memory size like 2GiB"
            ) from None
        if not math.isfinite(value) or not 0 < value <= 1:
            raise BudgetError(
                f"budget {raw!r} out of range: a fraction must be in (0, 1] "
                "(use an integer for tokens per head, or a size like 2GiB)"
            )
        return cls("fraction", value, raw)

    @classmethod
    def _tokens(cls, n: int, raw: str) -> Budget:
        if n <= 0:
            raise BudgetError(f"budget {raw!r} out of range: must be > 0")
        return cls("tokens", float(n), raw)

    def total_tokens(
        self,
        num_layers: int,
        num_kv_heads: int,
        context: int,
        *,
        head_dim: int | None = None,
        batch: int = 1,
        dtype_bytes: int = 2,
    ) -> int:
        """Total token slots over all ``num_layers * num_kv_heads`` heads.

        Raises :class:`BudgetError` when the budget exceeds the full cache at ``context``.
        """
        heads = num_layers * num_kv_heads
        full = heads * context
        if self.kind == "fraction":
            total = round(self.value * full)
        elif self.kind == "tokens":
            total = int(self.value) * heads
        else:
            if head_dim is None:
                raise BudgetError("a memory budget needs the model's head_dim")
            per_token = batch * 2 * head_dim * dtype_bytes
            total = int(self.value // per_token)
        if total > full:
            raise BudgetError(
                f"budget {self.text!r} asks for {total} token slots, more than the full cache "
                f"({heads} heads x {context} context = {full}); lower it or raise --max-context"
            )
        if total < 1:
            raise BudgetError(f"budget {self.text!r} leaves no token slot at all")
        return total


def parse_size(text: str) -> int:
    """Bytes of a memory size like ``"40GiB"`` or ``"512MB"``; :class:`BudgetError` otherwise."""
    budget = Budget.parse(text)
    if budget.kind != "bytes":
        raise BudgetError(f"{str(text).strip()!r} is not a memory size (use a unit: 40GiB, 512MB)")
    return int(budget.value)
