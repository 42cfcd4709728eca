"""Load a plugin's PTX and launch it with the CUDA driver API, the way TensorRT does.

TensorRT's ahead-of-time plugins hand TensorRT a kernel name, its PTX and launch parameters; at run time TensorRT loads the module and calls ``cuLaunchKernel`` with
the tensor pointers of the plugin's inputs, the scalar extras, then its outputs. This module does
the same through ``ctypes`` on ``libcuda`` (no extra dependency), so the GPU tests run the very
bytes an engine embeds, with the very arguments the plugin computes, without TensorRT.
"""

from __future__ import annotations

import ctypes
from functools import cache

from baklava.trt_plugins.aot import CompiledKernel, LaunchPlan

_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@cache
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA error {status}")


@cache
def _load(name: str, image: bytes) -> ctypes.c_void_p:
    import torch

    torch.cuda.init()  # the driver context the tensors live in
    lib = _driver()
    module, function = ctypes.c_void_p(), ctypes.c_void_p()
    _check(lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
    _check(lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
    return function


def launch_kernel(kernel: CompiledKernel, plan: LaunchPlan, args: dict, batch: int, seq: int) -> None:
    """Launch ``kernel`` (its PTX, JIT-compiled by the driver once) on torch's current stream:
    pointers of ``args`` (tensors) and the ``S`` scalar in the plan's order, grid from the plan,
    block ``num_warps * 32``."""
    import torch

    function = _load(kernel.name, kernel.ptx.encode() + b"\0")
    lib = _driver()
    if kernel.shared > 48 * 1024:
        _check(lib.cuFuncSetAttribute(function, _MAX_DYNAMIC_SHARED, kernel.shared), "cuFuncSetAttribute")
    values = []
    for name, kind in plan.types.items():
        value = args[name]
        if kind.startswith("*"):
            assert value.is_cuda and value.is_contiguous(), f"{name}: a contiguous CUDA tensor"
            values.append(ctypes.c_void_p(value.data_ptr()))
        else:
            values.append(ctypes.c_int32(int(value)))
    params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    gx, gy, gz = plan.grid(batch, seq)
    stream = torch.cuda.current_stream().cuda_stream
    status = lib.cuLaunchKernel(
        function, gx, gy, gz, kernel.block, 1, 1, kernel.shared, ctypes.c_void_p(stream), params, None
    )
    _check(status, f"cuLaunchKernel({kernel.name})")
