"""A pytest plugin that writes down every Triton kernel launch the interpreter runs (its argument
types, constexprs and launch options, not its data), for ``tests/gpu_compile.py`` to compile.

Loaded with ``-p tests.launch_recorder`` and ``BAKLAVA_LAUNCHES=path.json`` in interpreter mode.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

_LAUNCHES: dict[str, dict] = {}


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return ["tuple", list(value)]
    if value is None:
        return ["none", None]
    raise TypeError(f"a kernel argument of type {type(value).__name__} cannot be recorded")


def launch_spec(interpreted, args, kwargs) -> dict:
    """One launch of an interpreted kernel, described for :mod:`baklava.kernels.offline_compile`."""
    return {
        "module": interpreted.fn.__module__,
        "name": interpreted.fn.__name__,
        "jit": {k: list(v or []) for k, v in interpreted.kwargs.items() if k.startswith("do_not_specialize")},
        "args": [_describe(a) for a in args],
        "kwargs": {k: _describe(v) for k, v in kwargs.items()},
    }


def pytest_configure(config):
    if not os.environ.get("BAKLAVA_LAUNCHES"):
        raise pytest.UsageError("tests.launch_recorder: set BAKLAVA_LAUNCHES to the JSON file to write")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError(
            "tests.launch_recorder: records the interpreter's launches; set TRITON_INTERPRET=1"
        )
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self, args, kwargs)
        if spec["module"].startswith("baklava."):  # the project's kernels, not a test's own
            _LAUNCHES.setdefault(json.dumps(spec, sort_keys=True), spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    with open(os.environ["BAKLAVA_LAUNCHES"], "w", encoding="utf-8") as f:
        json.dump(list(_LAUNCHES.values()), f)
