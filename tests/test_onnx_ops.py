"""The baklava ONNX ops (ONNX-function implementations in ONNX Runtime) against the PyTorch cache."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnx extra not installed")
onnx = pytest.importorskip("onnx")

from baklava.eviction import EvictionConfig  # noqa: E402
from baklava.exporter.ops import single_layer_model  # noqa: E402
from baklava.runtime.packed_cache import BudgetedLayer  # noqa: E402
from tests.op_reference import D, assert_same_cache, reference_step, state, step_inputs  # noqa: E402


@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize(
    ("caps", "q_heads"),
    [([5, 12, 1], 6), ([16], 2), ([3, 40], 4)],
)
def test_ops_match_the_pytorch_cache_over_steps(policy, caps, q_heads):
    """Prefill (left-padded batch), then decode steps: ORT and the reference stay identical."""
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    kv_heads, batch = len(caps), 3
    model = single_layer_model(caps, q_heads, D, ev)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(sum(caps) + q_heads)
    layer = BudgetedLayer(caps, ev)
    steps = [(9, {1: 4, 2: 8}), (1, {}), (1, {}), (6, {}), (1, {})] + [(1, {})] * 4
    for seq, pads in steps:
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, kv_heads, seq, pads)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        feeds = {
            **state(layer),
            "query": q.numpy(),
            "key": k.numpy(),
            "value": v.numpy(),
            "token_mask": token_mask.numpy(),
        }
        got = sess.run(None, feeds)
        want = reference_step(layer, q, k, v, token_mask)
        valid_rows = token_mask.numpy()  # padding queries' outputs are don't-care
        for b in range(batch):
            np.testing.assert_allclose(
                got[0][b][:, valid_rows[b]], want[b][:, valid_rows[b]].numpy(), atol=1e-5
            )
        assert_same_cache(got, layer, caps)


def test_graph_is_checked_and_shapes_infer():
    model = single_layer_model([4, 9], 4, D, EvictionConfig())
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert inferred.graph.output[1].type.tensor_type.shape.dim[1].dim_value == 13  # packed: sum(cap) slots
    nodes = {n.op_type: n for n in model.graph.node}
    assert set(nodes) == {"BudgetedAttention", "BudgetedCacheUpdate"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes["BudgetedCacheUpdate"].attribute}
    assert attrs == {
        "capacities": [4, 9],
        "sink": 4,
        "window": 32,
        "policy": b"h2o",
        "pool_kernel": 31,
        "kv_dtype": b"auto",
    }
    assert {f.overload for f in model.functions} == {"layer0"}


@pytest.mark.parametrize(("kv_dtype", "head_dim"), [("int8", D), ("fp8", D), ("int4", 32)])
def test_kv_dtype_rounds_new_tokens_as_the_reference_store(kv_dtype, head_dim):
    """The ops' ``kv_dtype``: ORT attends and stores the rounded tokens the PyTorch reference
    store holds (same values, slot for slot), and they differ from the full-precision run."""
    caps, q_heads, batch = [5, 12], 4, 2
    ev = EvictionConfig(sink=1, window=2, obs_window=3, pool_kernel=1)
    sessions = {
        kv: ort.InferenceSession(
            single_layer_model(caps, q_heads, head_dim, ev, kv_dtype=kv).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        for kv in ("auto", kv_dtype)
    }
    gen = torch.Generator().manual_seed(5)
    layer = BudgetedLayer(caps, ev, kv_dtype)
    layer.quantized_storage = False  # the ops' cache is the reference store: float values on the grid
    layer.smooth_keys = False  # the ops round the keys they get (the graph smooths them before)
    for seq, pads in [(9, {1: 3}), (1, {}), (7, {}), (1, {})]:
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, pads, head_dim)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        feeds = {**state(layer), "query": q.numpy(), "key": k.numpy(), "value": v.numpy()}
        feeds["token_mask"] = token_mask.numpy()
        got = sessions[kv_dtype].run(None, feeds)
        plain = sessions["auto"].run(None, feeds)
        want = reference_step(layer, q, k, v, token_mask)
        rows = token_mask.numpy()
        for b in range(batch):
            np.testing.assert_allclose(got[0][b][:, rows[b]], want[b][:, rows[b]].numpy(), atol=1e-5)
        assert_same_cache(got, layer, caps)
        assert np.abs(plain[1] - got[1]).max() > 1e-4  # the stored keys were rounded
