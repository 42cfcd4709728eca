"""Build a Triton kernel for a GPU on any machine, from a description of one launch.

Triton compiles for a target without the device (its wheel ships ``ptxas`` and ``cuobjdump``).
A launch is described as ``tests/launch_recorder.py`` writes it, without data::

    {"module": "baklava.kernels.decode_attention", "name": "_split_kernel",
     "jit": {"do_not_specialize": [...], "do_not_specialize_on_alignment": [...]},
     "args": [["tensor", "bfloat16", True], ["int", 4096], ["float", 0.088], ...],
     "kwargs": {"BLOCK_N": ["int", 64], "num_warps": ["int", 4], ...}}

Ints and pointers are specialised on 16-divisibility as Triton's launcher does, except where the
kernel says not to. Gluon kernels (``triton.experimental.gluon.jit``) are described the same way. Used by the CPU test that compiles every launch the interpreter runs
(``tests/gpu_compile.py``) and by the benchmark that counts a kernel's machine code
(``benchmarks/kv/decode_sass.py``).
"""

from __future__ import annotations

import collections
import importlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

POINTEE = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8",
           "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1",
           "float8_e4m3fn": "fp8e4nv"}  # fmt: skip
OPTIONS = ("num_warps", "num_stages")
SCALES = {"KS", "VS", "KSN", "VSN"}  # float16 / int16 words whatever the model's dtype (kv_format)


def source(spec: dict):
    """``(key, ASTSource, options)`` of one described launch. ``spec["fp8"]`` names tensors to
    build as float8 e4m3 instead; ``spec["bf16"]`` builds its float16 tensors, scales apart, as
    bfloat16. ``key`` is equal for launches that compile to the same kernel."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (explicit layouts) builds alike
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
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


def launch_key(spec: dict) -> str:
    """Equal for launches that compile to the same kernel."""
    return source(spec)[0]


def compile_launch(spec: dict, arch: int):
    """The compiled kernel (``.asm["cubin"]``, ``.asm["ptx"]``, ...) of one launch for
    ``sm_{arch}``; raises the compiler's error."""
    import triton
    from triton.backends.compiler import GPUTarget

    _, src, options = source(spec)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def instruction_mix(cubin: bytes) -> dict:
    """``{"registers": n, "total": n, "opcodes": {opcode: count}}`` of one cubin (SASS counted
    statically with the ``cuobjdump`` Triton's wheel ships)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True)
    ops = collections.Counter()
    for line in sass.splitlines():
        found = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if found:
            ops[found.group(1)] += 1
    registers = re.search(r"REG:(\d+)", usage.stdout)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "total": sum(ops.values()),
        "opcodes": dict(ops.most_common()),
    }
