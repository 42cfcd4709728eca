"""Compile recorded Triton launches (``tests/launch_recorder.py``) for a GPU, on any machine.

Triton compiles for a target without the device (its wheel ships ``ptxas``), so the kernels the
CPU tests run in the interpreter can also be built as a GPU would build them: the compiler checks
what the interpreter does not (types across ``tl.where`` and stores, constexpr-only arguments,
shapes a tensor core accepts). Each distinct signature is compiled once; ints and pointers are
specialised on 16-divisibility as Triton's launcher does, except where the kernel says not to::

    python -m tests.gpu_compile launches.json [--arch 90]

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
import importlib
import json
import os

POINTEE = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8",
           "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1",
           "float8_e4m3fn": "fp8e4nv"}  # fmt: skip
OPTIONS = ("num_warps", "num_stages")


def source(spec: dict):
    """``(key, ASTSource, options)`` of one recorded launch."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    no_value = set(spec["jit"].get("do_not_specialize", []))
    no_align = set(spec["jit"].get("do_not_specialize_on_alignment", []))
    given = dict(zip(fn.arg_names, spec["args"], strict=False))
    given |= {k: v for k, v in spec["kwargs"].items() if k in fn.arg_names}
    options = {k: v[1] for k, v in spec["kwargs"].items() if k in OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        kind, value, *aligned = given.get(name, ["none", param.default])
        if param.is_constexpr or kind in ("none", "tuple"):
            signature[name], constexprs[(i,)] = "constexpr", tuple(value) if kind == "tuple" else value
        elif kind == "tensor":
            if name in spec.get("fp8", ()):
                value = "float8_e4m3fn"
            elif spec.get("bf16") and value == "float16" and name not in SCALES:
                value = "bfloat16"
            signature[name] = "*" + POINTEE[value]
            if aligned[0] and name not in no_align:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int":
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in no_value:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = {"float": "fp32", "bool": "i1"}[kind]
    key = json.dumps(
        [
            spec["module"],
            spec["name"],
            signature,
            sorted(map(repr, constexprs.items())),
            sorted(attrs),
            options,
        ]
    )
    return key, ASTSource(fn, signature, constexprs, attrs), options


SCALES = {"KS", "VS", "KSN", "VSN"}  # float16 whatever the model's dtype (kv_format.SCALE_DTYPE)


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
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import triton
    from triton.backends.compiler import GPUTarget

    with open(args.launches, encoding="utf-8") as f:
        specs = with_twins(json.load(f))
    done, compiled, failures = set(), collections.Counter(), []
    for spec in specs:
        key, src, options = source(spec)
        if key in done:
            continue
        done.add(key)
        name = f"{spec['module'].rsplit('.', 1)[-1]}.{spec['name']}"
        try:
            triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=options)
            compiled[name] += 1
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            failures.append([name, str(error)[-2000:]])
    print(json.dumps({"compiled": compiled, "failures": failures}))


if __name__ == "__main__":
    main()
