"""Which keyword hands a model its cache: ``cache=`` or ``past_key_values=``.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` on the models' ``forward`` and on
``generate`` (the old name warns, and goes in 5.40 / 6.0); 5.17, the GPU machine's version, knows
only the old one. The rename is a ``deprecate_kwarg`` decorator, whose wrapper keeps the old and
new names in its closure, so the answer is read from the function itself rather than from a
version number.
"""

from __future__ import annotations

import functools
import inspect


def forward_cache(model, cache) -> dict:
    """``model(..., **forward_cache(model, cache))``: the keyword ``model.forward`` takes."""
    return {_keyword(type(model).forward): cache}


def generate_cache(model, cache) -> dict:
    """``model.generate(..., **generate_cache(model, cache))``: the keyword ``generate`` takes."""
    return {_keyword(type(model).generate): cache}


@functools.cache
def _keyword(fn) -> str:
    while fn is not None:
        try:
            names = inspect.getclosurevars(fn).nonlocals
        except TypeError:  # a builtin or a C function: no closure to read
            break
        if names.get("old_name") == "past_key_values" and names.get("new_name") == "cache":
            return "cache"
        fn = getattr(fn, "__wrapped__", None)
    return "past_key_values"
