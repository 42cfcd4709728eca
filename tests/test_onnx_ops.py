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
    assert attrs == {"capacities": [4, 9], "sink": 4, "window": 32, "policy": b"h2o", "pool_kernel": 31}
    assert {f.overload for f in model.functions} == {"layer0"}
