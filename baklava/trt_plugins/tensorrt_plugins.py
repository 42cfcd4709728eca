"""TensorRT plugins of the ``baklava`` ops: ``baklava::BudgetedAttention`` and
``baklava::BudgetedCacheUpdate``, version 1, fields = the ONNX attributes (``spec``).

They use TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.11) with
**ahead-of-time** implementations only: at engine build time each plugin compiles its Triton
kernel (:mod:`~baklava.trt_plugins.aot`) to PTX for the build GPU and returns it with symbolic
launch parameters, so the engine carries the kernels and runs without Python (``trtexec``,
Triton Inference Server's TensorRT backend). No just-in-time implementation is registered:
both ops fit the one-kernel ABI.

``BudgetedCacheUpdate``'s outputs are declared *aliased* to its ``past_*`` inputs: the cache
is updated in place, and a runtime binds ``past.*`` and ``present.*`` to the same memory.

The shape functions are plain functions of descriptor objects (:func:`attention_outputs`,
:func:`cache_update_outputs`), unit-tested against the op spec without TensorRT. This module
imports ``tensorrt`` only in :func:`register`; this file must not use postponed annotations:
``tensorrt.plugin`` reads the annotations of the registered functions at definition time.
"""

import numpy as np
import numpy.typing as npt

from baklava.exporter.ops.spec import BUDGETED_ATTENTION, BUDGETED_CACHE_UPDATE, DOMAIN
from baklava.trt_plugins import aot

PLUGIN_VERSION = "1"
_T = "FP32|FP16|BF16"  # activations and cache: any of the three, the same one for all
_TRT_NAMES = {"i64": "INT64", "i1": "BOOL", "fp32": "FP32"}


def type_combinations(op) -> str:
    """TensorRT ``AutoTuneCombination`` types of ``op``: its inputs then outputs, ``|`` options
    aligned by position (float32 everywhere, or float16, or bfloat16)."""
    names = (*op.inputs, *op.outputs)
    return ", ".join(_TRT_NAMES[aot.FIXED_TYPES[n]] if n in aot.FIXED_TYPES else _T for n in names)


def _constant(expr, what: str) -> int | None:
    """The build-time value of a dimension; ``None`` where TensorRT only has a placeholder."""
    if getattr(expr, "is_fake", False):
        return None
    if not expr.is_constant:
        raise ValueError(f"{what} must be static in the graph")
    return int(expr.constant_value())


def _check_packed(past, capacities, what: str) -> None:
    total = _constant(past.shape_expr[1], f"{what} slots")
    if total is not None and total != int(np.sum(capacities)):
        raise ValueError(f"{what} holds {total} slots but the capacities sum to {int(np.sum(capacities))}")


def attention_outputs(query, key, value, past_key, past_value, past_fill, token_mask,
                      capacities, num_q_heads, float32, from_shape_expr):  # fmt: skip
    """``(output, slot_mass, token_mass)`` descriptors; raises ``ValueError`` on a graph that
    does not match the op spec (checked at engine build time)."""
    kv_heads = _constant(key.shape_expr[1], "key heads")
    if kv_heads is not None and kv_heads != len(capacities):
        raise ValueError(f"key has {kv_heads} heads but capacities has {len(capacities)}")
    q_heads = _constant(query.shape_expr[1], "query heads")
    if (q_heads is not None and q_heads != num_q_heads) or num_q_heads % len(capacities):
        raise ValueError(f"query heads must be num_q_heads={num_q_heads}, a multiple of {len(capacities)}")
    if not (query.dtype == key.dtype == value.dtype == past_key.dtype == past_value.dtype):
        raise ValueError("query, key, value and the cache must share one dtype")
    _check_packed(past_key, capacities, "past_key")
    batch, seq = query.shape_expr[0], query.shape_expr[2]
    slot_mass = from_shape_expr((batch, past_key.shape_expr[1]), float32)
    token_mass = from_shape_expr((batch, key.shape_expr[1], seq), float32)
    return query.like(), slot_mass, token_mass


def cache_update_outputs(past_key, past_value, past_position, past_score, past_fill, capacities):
    """``present_*`` descriptors: each aliased to its ``past_*`` input (an in-place update)."""
    _check_packed(past_key, capacities, "past_key")
    return tuple(t.aliased() for t in (past_key, past_value, past_position, past_score, past_fill))


def triton_dtype(trt, dtype) -> str:
    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype} (float32, float16 or bfloat16)")
    return names[dtype]


def _launch(trtp, plan: aot.LaunchPlan, batch, seq):
    kernel = plan.compile(aot.device_arch())  # the GPU the engine is built on
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = plan.grid(batch, seq)
    params.block_x = kernel.block
    params.shared_mem = kernel.shared
    extras = trtp.SymIntExprs(len(aot.EXTRAS))
    extras[0] = trtp.SymInt32(seq)
    return kernel.name, kernel.ptx, params, extras


_registered = False


def register() -> None:
    """Register both plugins with TensorRT's plugin registry (idempotent). Needs ``tensorrt``."""
    global _registered
    if _registered:
        return

    import tensorrt as trt
    import tensorrt.plugin as trtp

    Desc = trtp.TensorDesc
    Combos = list[trtp.AutoTuneCombination]

    @trtp.register(f"{DOMAIN}::{BUDGETED_ATTENTION.name}")
    def _attention(
        query: Desc, key: Desc, value: Desc, past_key: Desc, past_value: Desc, past_fill: Desc, token_mask: Desc,
        capacities: npt.NDArray[np.int32], num_q_heads: int, scale: float, obs_window: int, kv_dtype: str,
    ) -> tuple[Desc, Desc, Desc]:  # fmt: skip
        return attention_outputs(
            query, key, value, past_key, past_value, past_fill, token_mask,
            capacities, num_q_heads, trt.float32, trtp.from_shape_expr,
        )  # fmt: skip

    @trtp.autotune(f"{DOMAIN}::{BUDGETED_ATTENTION.name}")
    def _attention_types(
        query: Desc, key: Desc, value: Desc, past_key: Desc, past_value: Desc, past_fill: Desc, token_mask: Desc,
        outputs: tuple[Desc],
    ) -> Combos:  # fmt: skip
        return [trtp.AutoTuneCombination(type_combinations(BUDGETED_ATTENTION))]

    @trtp.aot_impl(f"{DOMAIN}::{BUDGETED_ATTENTION.name}")
    def _attention_aot(
        query: Desc, key: Desc, value: Desc, past_key: Desc, past_value: Desc, past_fill: Desc, token_mask: Desc,
        capacities: npt.NDArray[np.int32], num_q_heads: int, scale: float, obs_window: int, kv_dtype: str,
        outputs: tuple[Desc], tactic: int,
    ):  # fmt: skip
        plan = aot.attention_plan(
            capacities.tolist(), num_q_heads, scale, obs_window, kv_dtype=kv_dtype,
            head_dim=int(query.shape_expr[3].constant_value()), dtype=triton_dtype(trt, query.dtype),
        )  # fmt: skip
        return _launch(trtp, plan, query.shape_expr[0], query.shape_expr[2])

    @trtp.register(f"{DOMAIN}::{BUDGETED_CACHE_UPDATE.name}")
    def _update(
        past_key: Desc, past_value: Desc, past_position: Desc, past_score: Desc, past_fill: Desc, seen: Desc,
        key: Desc, value: Desc, token_mask: Desc, slot_mass: Desc, token_mass: Desc,
        capacities: npt.NDArray[np.int32], sink: int, window: int, policy: str, pool_kernel: int, kv_dtype: str,
    ) -> tuple[Desc, Desc, Desc, Desc, Desc]:  # fmt: skip
        return cache_update_outputs(past_key, past_value, past_position, past_score, past_fill, capacities)

    @trtp.autotune(f"{DOMAIN}::{BUDGETED_CACHE_UPDATE.name}")
    def _update_types(
        past_key: Desc, past_value: Desc, past_position: Desc, past_score: Desc, past_fill: Desc, seen: Desc,
        key: Desc, value: Desc, token_mask: Desc, slot_mass: Desc, token_mass: Desc, outputs: tuple[Desc],
    ) -> Combos:  # fmt: skip
        return [trtp.AutoTuneCombination(type_combinations(BUDGETED_CACHE_UPDATE))]

    @trtp.aot_impl(f"{DOMAIN}::{BUDGETED_CACHE_UPDATE.name}")
    def _update_aot(
        past_key: Desc, past_value: Desc, past_position: Desc, past_score: Desc, past_fill: Desc, seen: Desc,
        key: Desc, value: Desc, token_mask: Desc, slot_mass: Desc, token_mass: Desc,
        capacities: npt.NDArray[np.int32], sink: int, window: int, policy: str, pool_kernel: int, kv_dtype: str,
        outputs: tuple[Desc], tactic: int,
    ):  # fmt: skip
        plan = aot.cache_update_plan(
            capacities.tolist(), sink, window, policy, pool_kernel, kv_dtype=kv_dtype,
            head_dim=int(key.shape_expr[3].constant_value()), dtype=triton_dtype(trt, key.dtype),
        )  # fmt: skip
        return _launch(trtp, plan, key.shape_expr[0], key.shape_expr[2])

    _registered = True
