"""Launch plans of the ahead-of-time kernels: what a TensorRT plugin compiles and how it launches.

One :class:`LaunchPlan` per op instance (its attributes and the engine's dtype) is the single
source for the plugin's ``aot_impl`` (:mod:`baklava.trt_plugins.tensorrt_plugins`), the CUDA
driver launcher of the GPU tests (:mod:`baklava.trt_plugins.cuda_launch`) and the Triton
launcher of the CPU tests:

* ``signature``: Triton types of the kernel's arguments in TensorRT's order, the op's inputs
  (``spec``), the scalar extras (``S``), then its outputs;
* ``constexprs``: the attributes baked into the kernel (capacities, scale, policy...);
* ``grid(batch, seq)``: works on ints and on TensorRT's symbolic shape expressions alike;
* ``compile(arch)``: PTX for a compute capability. Every pointer is declared 16-byte aligned
  (TensorRT's buffers are), as Triton's own launcher does when it specialises a call: without
  that hint the loads are not vectorised (the kernels measured 3x to 10x slower on an H100).
  Triton appends two hidden pointer parameters (global and profile scratch) that TensorRT does
  not pass; our kernels use neither, and :func:`strip_hidden_params` removes them so the entry's
  parameters are exactly the plugin's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from baklava.exporter.ops.spec import BUDGETED_ATTENTION, BUDGETED_CACHE_UPDATE, OpSpec

DTYPES = ("fp32", "fp16", "bf16")
EXTRAS = ("S",)
# element types of the op tensors that are not the activation/cache type T (docs/ops.md)
FIXED_TYPES = {
    "past_fill": "i64", "present_fill": "i64", "seen": "i64", "past_position": "i64",
    "present_position": "i64", "token_mask": "i1", "slot_mass": "fp32", "token_mass": "fp32",
    "past_score": "fp32", "present_score": "fp32",
}  # fmt: skip


def device_arch() -> int:
    """Compute capability of the current CUDA device as an int (9.0 -> 90): the kernels' target."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int  # bytes of shared memory per block

    @property
    def block(self) -> int:
        return self.num_warps * 32


@dataclass(frozen=True)
class LaunchPlan:
    op: OpSpec
    types: dict[str, str]  # argument name -> Triton type, in ABI order
    constexprs: dict = field(hash=False)
    num_warps: int
    tiles: int  # query rows per tile (attention) or 0
    num_stages: int = 1  # no software pipelining: a tile's shared memory stays well under 100 KiB

    @property
    def fp_fusion(self) -> bool:
        """Whether the compiler may contract a multiply and an add into one FMA: not where int4
        vectors are rounded (their rotation adds products the reference rounds one by one)."""
        from baklava.kernels.kv_rounding import INT4

        return self.constexprs.get("KV_QUANT") != INT4

    @property
    def kv_heads(self) -> int:
        return len(self.constexprs["CAPS"])

    def grid(self, batch, seq):
        """``(x, y, z)`` for ``batch`` rows and ``seq`` new tokens (ints or shape expressions)."""
        if self.op is BUDGETED_ATTENTION:
            return ((seq + self.tiles - 1) // self.tiles, self.kv_heads, batch)
        return (self.kv_heads, batch, 1)

    def kernel(self):
        from baklava.trt_plugins import aot_attention, aot_cache_update

        if self.op is BUDGETED_ATTENTION:
            return aot_attention.budgeted_attention_kernel
        return aot_cache_update.budgeted_cache_update_kernel

    def compile(self, arch: int) -> CompiledKernel:
        """PTX for compute capability ``arch`` (e.g. 90), as the plugin embeds it in the engine."""
        import triton
        from triton.backends.compiler import GPUTarget

        fn = self.kernel()
        runtime = [name for name in fn.arg_names if name not in self.constexprs]  # in ABI order
        if len(runtime) != len(self.types):
            raise ValueError(f"{fn.__name__} takes {len(runtime)} arguments, the plan has {len(self.types)}")
        signature = dict(zip(runtime, self.types.values(), strict=True))
        signature.update(dict.fromkeys(self.constexprs, "constexpr"))
        aligned = {
            (fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t[0] == "*"
        }
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=self.constexprs, attrs=aligned)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={
                "num_warps": self.num_warps,
                "num_stages": self.num_stages,
                "enable_fp_fusion": self.fp_fusion,
            },
        )
        name = compiled.metadata.name
        ptx = strip_hidden_params(compiled.asm["ptx"], name, len(self.types))
        return CompiledKernel(name, ptx, compiled.metadata.num_warps, compiled.metadata.shared)


def _io_types(op: OpSpec, dtype: str) -> dict[str, str]:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; one of {', '.join(DTYPES)}")
    types = {name: f"*{FIXED_TYPES.get(name, dtype)}" for name in op.inputs}
    types["S"] = "i32"
    types.update({name: f"*{FIXED_TYPES.get(name, dtype)}" for name in op.outputs})
    return types


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} is not supported by the kernels (a power of two >= 16)")


def _rounding(kv_dtype: str, head_dim: int) -> dict:
    """The kernels' ``KV_QUANT`` / ``KV_GROUP`` constexprs: a quantized ``kv_dtype`` (the ONNX
    attribute) rounds each new token as the format gives it back, before it is attended to and
    stored (:mod:`baklava.kernels.kv_rounding`); the cache keeps the engine's dtype, as ONNX
    Runtime's does. A head dimension the format cannot take: a one-line ``ValueError``."""
    from baklava.errors import BaklavaError
    from baklava.kernels.kv_rounding import rounding

    try:
        return rounding(kv_dtype, head_dim)
    except BaklavaError as err:
        raise ValueError(str(err)) from None


def attention_plan(
    capacities,
    num_q_heads: int,
    scale: float,
    obs_window: int,
    *,
    head_dim: int,
    dtype: str,
    kv_dtype: str = "auto",
) -> LaunchPlan:
    import triton

    from baklava.trt_plugins.aot_attention import block_m, group_chunk

    caps = tuple(int(c) for c in capacities)
    types = _io_types(BUDGETED_ATTENTION, dtype)
    if num_q_heads % len(caps):
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of {len(caps)} KV heads")
    _check_head_dim(head_dim)
    group = num_q_heads // len(caps)
    tiles = block_m(obs_window)
    constexprs = dict(
        CAPS=caps, H_KV=len(caps), TOTAL=sum(caps), GROUP=group, G_CHUNK=group_chunk(group, tiles, dtype),
        ROWS=max(16, triton.next_power_of_2(group)), D=head_dim, SCALE=float(scale), OBS=int(obs_window),
        BLOCK_M=tiles, BLOCK_N=32, **_rounding(kv_dtype, head_dim),
    )  # fmt: skip
    stages = 1 if dtype == "fp32" else 2  # shared memory stays <= 48 KiB
    return LaunchPlan(BUDGETED_ATTENTION, types, constexprs, 4, tiles, num_stages=stages)


def cache_update_plan(
    capacities,
    sink: int,
    window: int,
    policy: str,
    pool_kernel: int,
    *,
    head_dim: int,
    dtype: str,
    kv_dtype: str = "auto",
) -> LaunchPlan:
    if policy not in ("h2o", "ring"):
        raise ValueError(f"unknown eviction policy {policy!r} (h2o or ring)")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be an odd positive int, got {pool_kernel}")
    _check_head_dim(head_dim)
    caps = tuple(int(c) for c in capacities)
    constexprs = dict(
        CAPS=caps, H_KV=len(caps), TOTAL=sum(caps), D=head_dim, SINK=int(sink), WINDOW=int(window),
        H2O=policy == "h2o", POOL=int(pool_kernel), BLOCK=64, **_rounding(kv_dtype, head_dim),
    )  # fmt: skip
    return LaunchPlan(BUDGETED_CACHE_UPDATE, _io_types(BUDGETED_CACHE_UPDATE, dtype), constexprs, 4, 0)


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\((.*?)\)", re.S)


def strip_hidden_params(ptx: str, name: str, expected: int) -> str:
    """Drop the entry's parameters after the first ``expected`` ones, which must be unused."""
    m = _ENTRY.search(ptx)
    if not m or m.group(1) != name:
        raise ValueError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) < expected:
        raise ValueError(f"{name} has {len(params)} parameters, the plugin passes {expected}")
    for extra in params[expected:]:
        pname = extra.split()[-1]
        if f"[{pname}]" in ptx:
            raise ValueError(f"{name} reads its hidden parameter {pname}; TensorRT would not pass it")
    kept = ",\n\t".join(params[:expected])
    return ptx[: m.start(2)] + "\n\t" + kept + "\n" + ptx[m.end(2) :]


def entry_params(ptx: str) -> list[str]:
    """The ``.param`` declarations of the PTX's kernel entry (for tests and ``baklava-check``)."""
    m = _ENTRY.search(ptx)
    return [p.strip() for p in m.group(2).split(",") if p.strip()] if m else []


def launch_with_triton(plan: LaunchPlan, args: dict, batch: int, seq: int) -> None:
    """Launch the plan's kernel through Triton's own launcher (the CPU interpreter, or a quick GPU
    check): same arguments, order, constants and grid as the plugin; the engine path is
    :func:`baklava.trt_plugins.cuda_launch.launch_kernel`."""
    ordered = [args[name] for name in plan.types]
    plan.kernel()[plan.grid(batch, seq)](
        *ordered, **plan.constexprs, num_warps=plan.num_warps, enable_fp_fusion=plan.fp_fusion
    )
