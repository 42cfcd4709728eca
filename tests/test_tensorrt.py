"""The TensorRT path as far as it runs without TensorRT, and the tests that need TensorRT.

Without TensorRT (this machine and CI: its libraries are not installable here, see the README)
these check everything around it: the plugins' shape and type functions against the op spec
(on a light stand-in for ``tensorrt.plugin.TensorDesc``, because the real module cannot be
imported here), the launch plans and the PTX the plugins embed, the ONNX graph handed to the
parser, the engine's optimization profile, the checks the runtime makes before it loads an
engine, and the one-line errors. The ``tensorrt``-marked tests build and run the default model's
engine; they are skipped here and run unchanged where TensorRT and a GPU exist.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from baklava.errors import BaklavaError
from baklava.exporter.ops.spec import BUDGETED_ATTENTION, BUDGETED_CACHE_UPDATE
from baklava.trt_plugins import aot, tensorrt_plugins
from tests.test_cli import FAST, assert_one_line_error, call

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed")


class Expr:
    """Stand-in for ``tensorrt.plugin.ShapeExpr``: a constant, or a named symbolic dimension."""

    def __init__(self, value):
        self.value = value

    @property
    def is_constant(self):
        return isinstance(self.value, int)

    def constant_value(self):
        return self.value

    def _op(self, sym, other):
        other = other.value if isinstance(other, Expr) else other
        if self.is_constant and isinstance(other, int):
            return Expr(int(eval(f"{self.value} {sym} {other}")))
        return Expr(f"({self.value} {sym} {other})")

    def __add__(self, other):
        return self._op("+", other)

    def __sub__(self, other):
        return self._op("-", other)

    def __floordiv__(self, other):
        return self._op("//", other)


class Desc:
    """Stand-in for ``tensorrt.plugin.TensorDesc`` (``shape_expr``, ``dtype``, ``like``, ``aliased``)."""

    def __init__(self, shape, dtype, aliased_to=None):
        self.shape_expr = [d if isinstance(d, Expr) else Expr(d) for d in shape]
        self.dtype = dtype
        self.aliased_to = aliased_to

    def like(self):
        return Desc(self.shape_expr, self.dtype)

    def aliased(self):
        return Desc(self.shape_expr, self.dtype, aliased_to=self)


def from_shape_expr(shape, dtype):
    return Desc(shape, dtype)


B, S = Expr("B"), Expr("S")
CAPS = np.array([5, 12, 1], dtype=np.int32)


def _attention_inputs(total=18, q_heads=6, dtype="f16"):
    return dict(
        query=Desc([B, q_heads, S, 64], dtype),
        key=Desc([B, 3, S, 64], dtype),
        value=Desc([B, 3, S, 64], dtype),
        past_key=Desc([B, total, 64], dtype),
        past_value=Desc([B, total, 64], dtype),
        past_fill=Desc([B, 3], "i64"),
        token_mask=Desc([B, S], "bool"),
    )


def test_attention_plugin_outputs_follow_the_op_spec():
    out, slot_mass, token_mass = tensorrt_plugins.attention_outputs(
        **_attention_inputs(), capacities=CAPS, num_q_heads=6, float32="f32", from_shape_expr=from_shape_expr
    )
    assert [d.value for d in out.shape_expr] == ["B", 6, "S", 64] and out.dtype == "f16"
    assert [d.value for d in slot_mass.shape_expr] == ["B", 18] and slot_mass.dtype == "f32"
    assert [d.value for d in token_mass.shape_expr] == ["B", 3, "S"] and token_mass.dtype == "f32"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(total=17), "holds 17 slots but the capacities sum to 18"),
        (dict(q_heads=4), "query heads must be num_q_heads=6"),
        (dict(dtype="mixed"), "share one dtype"),
    ],
)
def test_attention_plugin_rejects_a_graph_off_the_spec(change, message):
    inputs = _attention_inputs(**{k: v for k, v in change.items() if k != "dtype"})
    if change.get("dtype"):
        inputs["past_key"] = Desc([B, 18, 64], "f32")
    with pytest.raises(ValueError, match=message):
        tensorrt_plugins.attention_outputs(
            **inputs, capacities=CAPS, num_q_heads=6, float32="f32", from_shape_expr=from_shape_expr
        )


def test_cache_update_outputs_alias_the_past_cache():
    past = [Desc([B, 18, 64], "f16"), Desc([B, 18, 64], "f16"), Desc([B, 18], "i64"), Desc([B, 18], "f32")]
    past.append(Desc([B, 3], "i64"))
    outs = tensorrt_plugins.cache_update_outputs(*past, capacities=CAPS)
    assert [o.aliased_to for o in outs] == past
    assert [o.dtype for o in outs] == [p.dtype for p in past]
    with pytest.raises(ValueError, match="holds 18 slots but the capacities sum to 19"):
        tensorrt_plugins.cache_update_outputs(*past, capacities=np.array([6, 12, 1]))


def test_type_combinations_list_every_input_and_output():
    for op in (BUDGETED_ATTENTION, BUDGETED_CACHE_UPDATE):
        combos = [c.strip() for c in tensorrt_plugins.type_combinations(op).split(",")]
        assert len(combos) == len(op.inputs) + len(op.outputs)
        assert {len(c.split("|")) for c in combos} <= {1, 3}  # dependent options line up
    attention = tensorrt_plugins.type_combinations(BUDGETED_ATTENTION).split(", ")
    assert attention[BUDGETED_ATTENTION.inputs.index("token_mask")] == "BOOL"
    assert attention[-2:] == ["FP32", "FP32"]  # the masses


def test_launch_plans_work_on_symbolic_shapes():
    plan = aot.attention_plan(CAPS.tolist(), 6, 0.125, 32, head_dim=64, dtype="fp16")
    assert plan.grid(4, 100) == (4, 3, 4)  # ceil(100 / 32) query tiles, heads, rows
    x, y, z = plan.grid(B, S)
    assert (x.value, y, z.value) == ("(((S + 32) - 1) // 32)", 3, "B")
    upd = aot.cache_update_plan(CAPS.tolist(), 4, 32, "h2o", 7, head_dim=64, dtype="bf16")
    assert upd.grid(B, S)[:2] == (3, B)
    assert list(upd.types)[-5:] == list(BUDGETED_CACHE_UPDATE.outputs)
    assert list(plan.types) == [*BUDGETED_ATTENTION.inputs, "S", *BUDGETED_ATTENTION.outputs]
    with pytest.raises(ValueError, match="head_dim 80"):
        aot.attention_plan([4], 2, 0.1, 8, head_dim=80, dtype="fp16")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        aot.cache_update_plan([4], 1, 1, "lru", 1, head_dim=64, dtype="fp16")


COMPILE = """
import json, sys
from baklava.trt_plugins import aot
plans = [
    aot.attention_plan([100, 300, 64, 2], 8, 0.125, 32, head_dim=128, dtype="fp16"),
    aot.cache_update_plan([100, 300, 64, 2], 4, 32, "h2o", 7, head_dim=128, dtype="bf16"),
    # a quantized kv_dtype rounds new tokens in registers (kernels/kv_rounding.py)
    aot.attention_plan([100, 300, 64, 2], 8, 0.125, 32, head_dim=128, dtype="bf16", kv_dtype="int4"),
    aot.cache_update_plan([100, 300, 64, 2], 4, 32, "h2o", 7, head_dim=128, dtype="fp16", kv_dtype="fp8"),
]
out = []
for plan in plans:
    k = plan.compile(90)
    out.append({"name": k.name, "params": aot.entry_params(k.ptx), "shared": k.shared, "block": k.block,
                "types": list(plan.types.values()), "target": "sm_90" in k.ptx})
json.dump(out, sys.stdout)
"""


def test_plugins_compile_with_exactly_the_arguments_tensorrt_passes():
    """What ``aot_impl`` returns, compiled for sm_90 on this CPU (outside the interpreter)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for kernel in json.loads(done.stdout):
        assert kernel["target"]
        assert len(kernel["params"]) == len(kernel["types"])  # Triton's hidden scratch pointers are gone
        for param, kind in zip(kernel["params"], kernel["types"], strict=True):
            assert (".u64" in param) == kind.startswith("*"), (param, kind)
        assert kernel["shared"] <= 48 * 1024 and kernel["block"] == 128


def test_a_kernel_that_reads_a_hidden_parameter_is_refused():
    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n\tld.param.u64 %rd1, [k_param_1];\n}"
    with pytest.raises(ValueError, match="reads its hidden parameter k_param_1"):
        aot.strip_hidden_params(ptx, "k", 1)
    kept = aot.strip_hidden_params(ptx.replace("[k_param_1]", "[k_param_0]"), "k", 1)
    assert aot.entry_params(kept) == [".param .u64 k_param_0"]


def test_the_parser_graph_maps_baklava_nodes_to_plugins():
    onnx = pytest.importorskip("onnx")
    from baklava.eviction import EvictionConfig
    from baklava.exporter.ops import single_layer_model
    from baklava.trt_plugins.engine_build import plugin_graph

    model = single_layer_model([4, 9], 4, 16, EvictionConfig())
    graph = plugin_graph(model)
    assert len(model.functions) == 2 and len(graph.functions) == 0  # the original is untouched
    for node in graph.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"baklava" and attrs["plugin_version"] == b"1"
        assert attrs["capacities"] == [4, 9] and node.overload == ""
    assert [n.op_type for n in graph.graph.node] == ["BudgetedAttention", "BudgetedCacheUpdate"]


def test_engine_profile_covers_batch_and_tokens_only():
    from baklava.trt_plugins.engine_build import EngineShapes, profile_bounds

    shapes = EngineShapes(max_batch=8, max_tokens=512, opt_batch=4)
    assert profile_bounds([-1, -1], shapes) == ((1, 1), (4, 1), (8, 512))  # input_ids [B, S]
    assert profile_bounds([-1, 307, 16], shapes) == ((1, 307, 16), (4, 307, 16), (8, 307, 16))  # past key
    assert profile_bounds([-1], shapes) == ((1,), (4,), (8,))  # seen
    with pytest.raises(BaklavaError, match="dynamic axis"):
        profile_bounds([-1, -1, -1], shapes)


ENTRY = {
    "file": "model.engine",
    "tensorrt": "10.13.0.35",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "budget_profile_sha256": "ab12",
    "shapes": {"batch": [1, 1, 8], "tokens": [1, 1, 2048]},
}


def test_engine_checks_reject_other_tensorrt_gpu_and_shapes():
    from baklava.backends.tensorrt_backend import check_engine, check_shapes

    here = dict(tensorrt_version="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", capability="9.0")
    here["budget_profile_sha256"] = "ab12"
    check_engine(ENTRY, **here)
    with pytest.raises(BaklavaError, match="another budget profile"):
        check_engine(ENTRY, **{**here, "budget_profile_sha256": "cd34"})
    with pytest.raises(BaklavaError, match="built with TensorRT 10.13.0.35, this is 10.14.0.1"):
        check_engine(ENTRY, **{**here, "tensorrt_version": "10.14.0.1"})
    with pytest.raises(
        BaklavaError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0\), this GPU is NVIDIA A10G"
    ):
        check_engine(ENTRY, **{**here, "gpu": "NVIDIA A10G", "capability": "8.6"})
    with pytest.raises(BaklavaError, match="no TensorRT engine"):
        check_engine(None, **here)
    check_shapes(ENTRY, batch=8, tokens=2048)
    with pytest.raises(BaklavaError, match="batch 9 exceeds"):
        check_shapes(ENTRY, batch=9)
    with pytest.raises(BaklavaError, match="2049 tokens in one step exceed"):
        check_shapes(ENTRY, tokens=2049)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_export_engine_without_tensorrt_is_one_line_and_keeps_the_onnx_artifact(
    tiny_model_dir, tmp_path, capfd
):
    from baklava.cli import export_main, run_main

    out = tmp_path / "art"
    argv = ["--model", tiny_model_dir, "--budget", "0.3", "--out", out, *FAST, "--no-search", "--engine"]
    code, _, err = call(export_main, argv, capfd)
    assert code not in (0, None)
    errors = [line for line in err.splitlines() if "error" in line]  # after the export's progress lines
    assert errors == [err.splitlines()[-1]] and errors[0].startswith("baklava-export: error: --engine: ")
    assert "TensorRT is not installed" in errors[0] and "is complete" in errors[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backends"] == ["torch", "onnxruntime"] and "engine" not in manifest
    assert not (out / "model.engine").exists() and (out / "model.onnx").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staged graph left behind
    code, _, err = call(run_main, [out, "--prompt", "the", "--backend", "tensorrt"], capfd)
    assert_one_line_error(code, err, "baklava-run", "TensorRT is not installed")
    code, stdout, err = call(
        run_main, [out, "--prompt", "the a", "--no-chat", "--backend", "onnxruntime"], capfd
    )
    assert code == 0, err  # the ONNX artifact still runs


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.model
def test_default_model_engine_greedy_tokens_match_the_reference(tmp_path, capfd):
    """Build the default model's engine (fp32), decode 32 greedy tokens, compare with PyTorch."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from baklava.check import check
    from baklava.exporter import read_artifact
    from tests.conftest import export_smol

    out = export_smol(tmp_path / "art", "0.3", "--engine")
    art = read_artifact(out)
    assert (out / "model.engine").is_file() and art.manifest["engine"]["precision"] == "fp32"
    verdicts, tokens = check(art, ["tensorrt"], context=256, steps=32, atol=1e-3, rtol=1e-3)
    verdict = {v.backend: v for v in verdicts}["tensorrt"]
    assert verdict.status == "pass", verdict.row()
    assert verdict.argmax_agree == 1.0 and len(tokens) == 32
    # free-running greedy decoding, as baklava-run does it
    from baklava.cli import run_main

    tokens = {}
    for backend in ("torch", "tensorrt"):
        argv = [out, "--prompt", "Explain the KV cache.", "--max-new-tokens", "32", "--json"]
        argv += ["--backend", backend, "--device", "cpu"] if backend == "torch" else ["--backend", backend]
        code, stdout, err = call(run_main, argv, capfd)
        assert code == 0, err
        tokens[backend] = json.loads(stdout)["token_ids"]
    assert tokens["torch"] and tokens["tensorrt"] == tokens["torch"]  # up to 32 (or until EOS)


@pytest.mark.tensorrt
@needs_tensorrt
def test_an_engine_from_another_tensorrt_is_refused(tmp_path):
    from baklava.backends.tensorrt_backend import TensorRTDecoder

    manifest = {"engine": {**ENTRY, "tensorrt": "0.0.0"}, "profile": {"sha256": "ab12"}}
    with pytest.raises(BaklavaError, match="built with TensorRT 0.0.0"):
        TensorRTDecoder(tmp_path, manifest)
