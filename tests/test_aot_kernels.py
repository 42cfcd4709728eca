"""The TensorRT plugins' ahead-of-time kernels against the PyTorch reference (``BudgetedLayer``).

A left-padded prefill chunk, then decode steps and a second chunk, through a layer whose heads
fill up and evict (h2o and ring): every step's attention output and the whole cache state after
the update must match the reference slot for slot. The kernels are launched with the plugin's
own launch plan (arguments in TensorRT's order, its grid and constants), through Triton's
launcher: on the CPU that is Triton's interpreter, so CI runs these; on a GPU the test in
the ``gpu`` tests below also load the compiled kernels with the CUDA driver, as TensorRT does.
"""

import numpy as np
import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime.packed_cache import BudgetedLayer
from tests.op_reference import assert_same_cache, reference_step, step_inputs
from tests.triton_env import DEVICE

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.trt_plugins import aot  # noqa: E402

HEAD_DIM = 16
STEPS = [(9, {1: 4, 2: 8}), (1, {}), (1, {}), (6, {0: 2}), (1, {}), (1, {})]


def layer_state(layer, dtype=torch.float32):
    """Copies of the cache tensors as the engine holds them (contiguous, on the test device)."""
    to = dict(device=DEVICE)
    return {
        "past_key": layer.keys.to(dtype=dtype, **to).clone(),
        "past_value": layer.values.to(dtype=dtype, **to).clone(),
        "past_position": layer.positions.to(dtype=torch.int64, **to).clone(),  # the graph's dtype
        "past_score": layer.scores.to(**to).clone(),
        "past_fill": layer.fill.to(**to).clone(),
        "seen": layer.valid_seen.to(**to).clone(),
    }


def run_plugins(launch, plans, state, q, k, v, token_mask, dtype=torch.float32):
    """One layer step through both kernels; the cache outputs alias the inputs (in place)."""
    attn, upd = plans
    batch, q_heads, seq, d = q.shape
    total = state["past_key"].shape[1]
    dev = dict(device=DEVICE)
    args = {
        **state,
        "query": q.to(dtype=dtype, **dev).contiguous(),
        "key": k.to(dtype=dtype, **dev).contiguous(),
        "value": v.to(dtype=dtype, **dev).contiguous(),
        "token_mask": token_mask.to(**dev).contiguous(),
        "S": seq,
        "output": torch.empty(batch, q_heads, seq, d, dtype=dtype, **dev),
        "slot_mass": torch.full((batch, total), float("nan"), **dev),
        "token_mass": torch.full((batch, k.shape[1], seq), float("nan"), **dev),
    }
    launch(attn, args, batch, seq)
    for name in ("key", "value", "position", "score", "fill"):
        args[f"present_{name}"] = args[f"past_{name}"]  # aliased, as the plugin declares
    launch(upd, args, batch, seq)
    return args


@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize(("caps", "q_heads"), [([5, 12, 1], 6), ([16], 2), ([3, 40], 4), ([7, 20], 16)])
def test_kernels_match_the_reference_over_steps(policy, caps, q_heads):
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=4, pool_kernel=3)
    plans = (
        aot.attention_plan(caps, q_heads, HEAD_DIM**-0.5, ev.obs_window, head_dim=HEAD_DIM, dtype="fp32"),
        aot.cache_update_plan(
            caps, ev.sink, ev.window, ev.policy, ev.pool_kernel, head_dim=HEAD_DIM, dtype="fp32"
        ),
    )
    batch = 3
    gen = torch.Generator().manual_seed(sum(caps) + q_heads)
    layer = BudgetedLayer(caps, ev)
    evicted = False
    for seq, pads in STEPS:
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, pads, head_dim=HEAD_DIM)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        state = layer_state(layer)
        got = run_plugins(aot.launch_with_triton, plans, state, q, k, v, token_mask)
        want = reference_step(layer, q, k, v, token_mask)
        for b in range(batch):
            rows = token_mask[b].numpy()  # padding queries' outputs are don't-care
            np.testing.assert_allclose(
                got["output"][b][:, rows].cpu().numpy(), want[b][:, rows].numpy(), atol=2e-5
            )
        names = ("output", "past_key", "past_value", "past_position", "past_score", "past_fill")
        assert_same_cache([got[n].cpu().numpy() for n in names], layer, caps, atol=1e-6)
        evicted |= bool(
            (layer.fill < torch.tensor(caps)).logical_not().any()
        ) and layer.valid_seen.max() > min(caps)
    assert evicted  # the steps reached the eviction branches, not only appends


def test_masses_are_the_observation_windows_attention():
    """slot_mass + token_mass of a query row sum to 1 per head (averaged over the group)."""
    caps, q_heads, obs = [6, 4], 4, 2
    plan = aot.attention_plan(caps, q_heads, HEAD_DIM**-0.5, obs, head_dim=HEAD_DIM, dtype="fp32")
    gen = torch.Generator().manual_seed(3)
    batch, seq = 2, 5
    q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, {1: 2}, head_dim=HEAD_DIM)
    layer = BudgetedLayer(caps, EvictionConfig(obs_window=obs))
    layer.lazy_initialization(k, v)
    state = layer_state(layer)
    state["past_fill"][:] = torch.tensor([[3, 4], [0, 2]])
    state["past_key"].normal_(generator=torch.Generator(device=DEVICE).manual_seed(1))
    args = {**state, "query": q.to(DEVICE), "key": k.to(DEVICE), "value": v.to(DEVICE),
            "token_mask": token_mask.to(DEVICE), "S": seq,
            "output": torch.empty(batch, q_heads, seq, HEAD_DIM, device=DEVICE),
            "slot_mass": torch.full((batch, 10), -1.0, device=DEVICE),
            "token_mass": torch.full((batch, 2, seq), -1.0, device=DEVICE)}  # fmt: skip
    aot.launch_with_triton(plan, args, batch, seq)
    slot, tok = args["slot_mass"].cpu(), args["token_mass"].cpu()
    per_head = torch.stack([slot[:, :6].sum(1), slot[:, 6:].sum(1)], 1) + tok.sum(2)
    torch.testing.assert_close(per_head, torch.full((batch, 2), float(obs)), atol=1e-5, rtol=0)
    assert (slot[0, 3:6] == 0).all() and (slot[1, 0:6] == 0).all()  # slots past the fill get none
    assert (tok[1, :, :2] == 0).all()  # padding tokens get none


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_STEPS = [(40, {1: 7, 2: 30}), (1, {}), (1, {}), (17, {0: 3}), (1, {}), (1, {})]


def _driver_launcher(plans):
    """Compile each plan to PTX for this GPU and launch it with the CUDA driver, as TensorRT
    launches what the plugin returns."""
    from baklava.trt_plugins.cuda_launch import launch_kernel

    kernels = {id(plan): plan.compile(aot.device_arch()) for plan in plans}

    def launch(plan, args, batch, seq):
        launch_kernel(kernels[id(plan)], plan, args, batch, seq)

    return launch


def _plans(caps, q_heads, head_dim, ev, dtype, kv_dtype="auto"):
    return (
        aot.attention_plan(
            caps, q_heads, head_dim**-0.5, ev.obs_window, head_dim=head_dim, dtype=dtype, kv_dtype=kv_dtype
        ),
        aot.cache_update_plan(
            caps,
            ev.sink,
            ev.window,
            ev.policy,
            ev.pool_kernel,
            head_dim=head_dim,
            dtype=dtype,
            kv_dtype=kv_dtype,
        ),
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("policy", ["h2o", "ring"])
@pytest.mark.parametrize(
    ("caps", "q_heads", "head_dim"),
    [([5, 12, 1], 6, 64), ([1, 300, 77, 33], 32, 128), ([16], 7, 64)],  # capacity 1, caps off the tile size
)
def test_kernels_launched_like_tensorrt_match_the_reference(policy, caps, q_heads, head_dim):
    """fp32: the kernels the plugins embed, launched with their launch parameters, step for step."""
    ev = EvictionConfig(sink=2, window=3, policy=policy, obs_window=8, pool_kernel=5)
    plans = _plans(caps, q_heads, head_dim, ev, "fp32")
    launch = _driver_launcher(plans)
    batch = 3
    gen = torch.Generator().manual_seed(len(caps) + q_heads)
    layer = BudgetedLayer(caps, ev)
    for seq, pads in GPU_STEPS:
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, pads, head_dim=head_dim)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        got = run_plugins(launch, plans, layer_state(layer), q, k, v, token_mask)
        want = reference_step(layer, q, k, v, token_mask)
        for b in range(batch):
            rows = token_mask[b].numpy()
            np.testing.assert_allclose(
                got["output"][b][:, rows].cpu().numpy(), want[b][:, rows].numpy(), atol=1e-4
            )
        names = ("output", "past_key", "past_value", "past_position", "past_score", "past_fill")
        assert_same_cache([got[n].cpu().numpy() for n in names], layer, caps, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_in_half_precision(dtype):
    """fp16/bf16 engines: attention within half-precision tolerance of fp32; given the same masses,
    the cache update keeps the same slots and copies keys and values bit for bit."""
    caps, q_heads, head_dim, batch = [5, 40, 1, 64], 16, 128, 2
    ev = EvictionConfig(sink=2, window=3, obs_window=8, pool_kernel=5)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    full, half = _plans(caps, q_heads, head_dim, ev, "fp32"), _plans(caps, q_heads, head_dim, ev, name)
    launch = _driver_launcher((*full, *half))
    gen = torch.Generator().manual_seed(7)
    layer = BudgetedLayer(caps, ev)
    q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), 30, {1: 4}, head_dim=head_dim)
    layer.lazy_initialization(k, v)
    reference_step(layer, q, k, v, token_mask)
    for seq in (1, 9):
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, {}, head_dim=head_dim)
        exact = run_plugins(launch, full, layer_state(layer), q, k, v, token_mask)
        state = layer_state(layer, dtype)
        approx = {**state, "query": q.to("cuda", dtype), "key": k.to("cuda", dtype), "value": v.to("cuda", dtype),
                  "token_mask": token_mask.cuda(), "S": seq,
                  "output": torch.empty(batch, q_heads, seq, head_dim, dtype=dtype, device="cuda"),
                  "slot_mass": torch.empty(batch, sum(caps), device="cuda"),
                  "token_mass": torch.empty(batch, len(caps), seq, device="cuda")}  # fmt: skip
        launch(half[0], approx, batch, seq)
        tol = 2e-2 if dtype == torch.float16 else 6e-2
        torch.testing.assert_close(approx["output"].float(), exact["output"], atol=tol, rtol=0)
        torch.testing.assert_close(approx["slot_mass"], exact["slot_mass"], atol=tol / 4, rtol=0)
        approx["slot_mass"], approx["token_mass"] = exact["slot_mass"], exact["token_mass"]  # same choice
        for field in ("key", "value", "position", "score", "fill"):
            approx[f"present_{field}"] = approx[f"past_{field}"]
        launch(half[1], approx, batch, seq)
        assert torch.equal(approx["past_fill"], exact["past_fill"])
        for b in range(batch):
            for h, off in enumerate(np.cumsum([0, *caps[:-1]])):
                live = slice(off, off + int(exact["past_fill"][b, h]))
                assert torch.equal(approx["past_position"][b, live], exact["past_position"][b, live])
                assert torch.equal(approx["past_key"][b, live], exact["past_key"][b, live].to(dtype))
        reference_step(layer, q, k, v, token_mask)


@pytest.mark.parametrize(("kv_dtype", "head_dim"), [("int8", HEAD_DIM), ("fp8", HEAD_DIM), ("int4", 32)])
def test_kv_dtype_rounds_new_tokens_as_the_reference_store(kv_dtype, head_dim):
    """The plugins carry the ops' ``kv_dtype``: both kernels attend to and store each new token
    rounded as the format gives it back, the values the PyTorch reference store (and ONNX
    Runtime, ``test_onnx_ops``) holds, slot for slot, through appends and evictions; and they
    differ from what full-precision plugins store."""
    caps, q_heads, batch = [5, 12], 4, 2
    ev = EvictionConfig(sink=1, window=2, obs_window=3, pool_kernel=3)
    rounded = _plans(caps, q_heads, head_dim, ev, "fp32", kv_dtype)
    plain = _plans(caps, q_heads, head_dim, ev, "fp32")
    gen = torch.Generator().manual_seed(5)
    layer = BudgetedLayer(caps, ev, kv_dtype)
    layer.quantized_storage = False  # the ops' cache is the reference store: float values on the grid
    layer.smooth_keys = False  # the ops round the keys they get (the graph smooths them before)
    for seq, pads in [(9, {1: 3}), (1, {}), (7, {}), (1, {})]:
        q, k, v, token_mask = step_inputs(gen, batch, q_heads, len(caps), seq, pads, head_dim=head_dim)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        got = run_plugins(aot.launch_with_triton, rounded, layer_state(layer), q, k, v, token_mask)
        full = run_plugins(aot.launch_with_triton, plain, layer_state(layer), q, k, v, token_mask)
        want = reference_step(layer, q, k, v, token_mask)
        for b in range(batch):
            rows = token_mask[b].numpy()
            np.testing.assert_allclose(
                got["output"][b][:, rows].cpu().numpy(), want[b][:, rows].numpy(), atol=2e-5
            )
        names = ("output", "past_key", "past_value", "past_position", "past_score", "past_fill")
        assert_same_cache([got[n].cpu().numpy() for n in names], layer, caps)
        for b in range(batch):  # the live slots' keys and values bit for bit
            for h, off in enumerate(np.cumsum([0, *caps[:-1]])):
                live = slice(off, off + int(layer.fill[b, h]))
                assert torch.equal(got["past_key"][b, live].cpu(), layer.keys[b, live])
                assert torch.equal(got["past_value"][b, live].cpu(), layer.values[b, live])
        assert (full["past_key"] - got["past_key"]).abs().max() > 1e-4  # the stored keys were rounded


def test_plans_refuse_a_head_dimension_the_kv_dtype_cannot_take():
    """int4 groups 32 channels after a power-of-two rotation: a 16-channel head fails at build
    time with the format's one-line reason."""
    with pytest.raises(ValueError, match="--kv-dtype int4 needs a head dimension divisible by 32"):
        aot.attention_plan([8, 8], 4, 0.25, 4, head_dim=16, dtype="fp32", kv_dtype="int4")
    with pytest.raises(ValueError, match="unknown KV dtype 'int3'"):
        aot.cache_update_plan([8, 8], 1, 2, "h2o", 3, head_dim=16, dtype="fp32", kv_dtype="int3")
    plan = aot.attention_plan([8, 8], 4, 0.25, 4, head_dim=16, dtype="fp32", kv_dtype="auto")
    assert (plan.constexprs["KV_QUANT"], plan.fp_fusion) == (0, True)
    int4 = aot.cache_update_plan([8, 8], 1, 2, "h2o", 3, head_dim=64, dtype="bf16", kv_dtype="int4")
    assert (int4.constexprs["KV_QUANT"], int4.constexprs["KV_GROUP"], int4.fp_fusion) == (2, 32, False)
