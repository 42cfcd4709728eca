"""Compile recorded Triton launches (``tests/launch_recorder.py``) for a GPU, on any machine.

The kernels the CPU tests run in the interpreter are built as a GPU would build them
(:mod:`baklava.kernels.offline_compile`): the compiler checks what the interpreter does not
(types across ``tl.where`` and stores, constexpr-only arguments, shapes a tensor core accepts).
Each distinct signature is compiled once::

    python -m tests.gpu_compile launches.json [--arch 90]
    python -m tests.gpu_compile launches.json --keys    # each launch's variant key, as JSON

The interpreter runs neither float8 nor bfloat16, so twins stand in for what the GPU launches:
every launch over int8 slots (``QUANT=3``, :func:`baklava.kernels.decode_attention._quant_mode`)
is also compiled over fp8 ones (``QUANT=1``, the payload ``K`` / ``V`` as float8 e4m3), and every
launch with float16 tensors also with those in bfloat16 (the models' dtype on the GPU), the
quantized slots' scales (``KS``, ``VS``, ``KSN``, ``VSN``) left in float16 as they are stored.

Prints one JSON line: variants compiled per kernel and the failures (kernel, the compiler's
message). Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from baklava.kernels.offline_compile import compile_launch, launch_key


def run(launches: Path, *flags: str, timeout: float = 1800) -> dict | list:
    """This module on ``launches`` in a process of its own, without the interpreter (a test runs
    under it); its printed JSON. Raises ``AssertionError`` with its stderr when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu_compile", str(launches), *flags],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def with_twins(specs: list[dict]) -> list[dict]:
    """``specs``, the fp8 twin of each launch over int8 slots, and the bf16 twin of every launch
    (fp8 ones included) with float16 tensors (module docstring)."""
    fp8 = [
        dict(spec, kwargs=spec["kwargs"] | {"QUANT": ["int", 1]}, fp8=["K", "V"])
        for spec in specs
        if spec["kwargs"].get("QUANT") == ["int", 3]
    ]
    half = [spec for spec in specs + fp8 if any(a[:2] == ["tensor", "float16"] for a in spec["args"])]
    return specs + fp8 + [dict(spec, bf16=True) for spec in half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument(
        "--keys", action="store_true", help="print each launch's variant key, compile nothing"
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    with open(args.launches, encoding="utf-8") as f:
        specs = json.load(f)
    if args.keys:
        print(json.dumps([launch_key(spec) for spec in specs]))
        return
    specs = with_twins(specs)
    done, compiled, failures = set(), collections.Counter(), []
    for spec in specs:
        key = launch_key(spec)
        if key in done:
            continue
        done.add(key)
        name = f"{spec['module'].rsplit('.', 1)[-1]}.{spec['name']}"
        try:
            compile_launch(spec, args.arch)
            compiled[name] += 1
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            failures.append([name, str(error)[-2000:]])
    print(json.dumps({"compiled": compiled, "failures": failures}))


if __name__ == "__main__":
    main()
