"""The exported decoder graph in ONNX Runtime against the PyTorch reference (tiny random Llama)."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx extra not installed")
pytest.importorskip("onnxruntime")

from baklava.backends.onnx_backend import OnnxDecoder  # noqa: E402
from baklava.errors import ModelError  # noqa: E402
from baklava.eviction import EvictionConfig  # noqa: E402
from baklava.exporter.graph_builder import build_decoder, save_model  # noqa: E402
from baklava.profiles.head_scores import HeadScores  # noqa: E402
from baklava.profiles.profile_file import BudgetProfile, ModelInfo  # noqa: E402
from baklava.runtime import BudgetedCache, enable  # noqa: E402
from baklava.runtime.cache_keyword import forward_cache  # noqa: E402
from baklava.runtime.packed_cache import BudgetedLayer  # noqa: E402

CAPS = np.array([[10, 17], [13, 8]])


def _profile(model, caps=CAPS, policy="h2o"):
    info = ModelInfo.from_config(model.config, "tiny")
    ev = EvictionConfig(sink=2, window=4, policy=policy)
    return BudgetProfile(info, HeadScores.constant(*caps.shape), eviction=ev, capacities=caps)


@pytest.fixture
def exported(tiny_llama, tmp_path):
    def export(caps=CAPS, policy="h2o"):
        path = tmp_path / f"model-{policy}.onnx"
        save_model(build_decoder(tiny_llama, _profile(tiny_llama, caps, policy), progress=False), path)
        return path

    return export


def test_graph_checks_and_has_packed_cache_inputs(exported):
    path = exported()
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in inferred.graph.input
    }
    for layer, caps in enumerate(CAPS):
        assert dims[f"past.{layer}.key"] == ["batch", int(caps.sum()), 16]  # exactly sum(cap) slots
        assert dims[f"past.{layer}.fill"] == ["batch", 2]
    ops = [n for n in model.graph.node if n.domain == "baklava"]
    assert [n.op_type for n in ops] == ["BudgetedAttention", "BudgetedCacheUpdate"] * 2
    assert [n.overload for n in ops] == ["layer0", "layer0", "layer1", "layer1"]


@pytest.mark.parametrize("policy", ["h2o", "ring"])
def test_evicting_prefill_and_decode_match_the_reference(tiny_llama, exported, policy):
    decoder = OnnxDecoder(exported(policy=policy))
    enable(tiny_llama)
    cache = BudgetedCache(CAPS, _profile(tiny_llama, policy=policy).eviction)
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    buffers = decoder.new_cache(2)
    seen = np.zeros(2, dtype=np.int64)
    got = decoder.step(buffers, ids.numpy(), positions.numpy(), mask.numpy(), seen)
    with torch.no_grad():
        want = tiny_llama(
            input_ids=ids, attention_mask=mask.long(), **forward_cache(tiny_llama, cache)
        ).logits
    np.testing.assert_allclose(got[mask.numpy()], want[mask].numpy(), atol=1e-4)
    seen = seen + mask.sum(1).numpy()
    full_mask = mask.long()
    token = torch.tensor([[5], [9]])
    for _ in range(8):  # decode steps with the caches full: every step evicts
        got = decoder.step(buffers, token.numpy(), seen[:, None], np.ones((2, 1), bool), seen)
        full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with torch.no_grad():
            want = tiny_llama(
                input_ids=token, attention_mask=full_mask, **forward_cache(tiny_llama, cache)
            ).logits
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        seen = seen + 1
        token = want[:, -1].argmax(-1, keepdim=True)
    fills = [buffers.read()[f"past.{layer}.fill"].numpy() for layer in range(2)]
    np.testing.assert_array_equal(np.stack(fills), cache.fill_levels().numpy())


def test_cache_buffers_are_reused_across_steps(tiny_llama, exported):
    decoder = OnnxDecoder(exported())
    buffers = decoder.new_cache(1)
    before = {k: v.data_ptr() for s in buffers.sets for k, v in s.items()}
    for t in range(3):
        decoder.step(buffers, np.array([[7]]), np.array([[t]]), np.ones((1, 1), bool), np.array([t]))
    after = {k: v.data_ptr() for s in buffers.sets for k, v in s.items()}
    assert before == after  # double buffering: no cache tensor reallocated per token
    assert int(buffers.read()["past.0.fill"].numpy()[0, 0]) == 3
    assert buffers.nbytes("kv") == int(CAPS.sum()) * 2 * 16 * 4  # sum(cap) x K,V x head_dim x fp32


def test_unsupported_architecture_is_refused(tiny_llama):
    tiny_llama.config.model_type = "gpt2"
    with pytest.raises(ModelError, match="supported: llama, mistral, qwen2"):
        build_decoder(tiny_llama, _profile(tiny_llama), progress=False)


def test_an_int8_artifact_runs_in_onnx_runtime_as_the_int8_reference(tiny_llama, tmp_path):
    """Keys smoothed in the graph as the runtime stores them (``BudgetedLayer.smooth_keys``, on by
    default): same logits, same mean keys, same stored keys, through an evicting prefill and decode."""
    assert BudgetedLayer.smooth_keys
    profile = _profile(tiny_llama)
    profile.allocation = {"kv_dtype": "int8"}  # what baklava-export --kv-dtype int8 records
    path = tmp_path / "int8.onnx"
    save_model(build_decoder(tiny_llama, profile, progress=False), path)
    ops = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == "baklava"]
    assert {onnx.helper.get_attribute_value(a) for n in ops for a in n.attribute if a.name == "kv_dtype"} == {
        b"int8"
    }
    decoder = OnnxDecoder(path)
    enable(tiny_llama)
    caches = {kv: BudgetedCache(CAPS, profile.eviction, kv) for kv in ("auto", "int8")}
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    buffers, seen = decoder.new_cache(1), np.zeros(1, dtype=np.int64)
    ones = np.ones_like(ids.numpy(), dtype=bool)
    got = decoder.step(buffers, ids.numpy(), np.arange(30)[None], ones, seen)
    with torch.no_grad():
        want = {
            kv: tiny_llama(input_ids=ids, **forward_cache(tiny_llama, c)).logits for kv, c in caches.items()
        }
    np.testing.assert_allclose(got, want["int8"].numpy(), atol=1e-4)
    assert np.abs(got - want["auto"].numpy()).max() > 1e-4  # int8 is not the full-precision answer
    token, seen = want["int8"][:, -1].argmax(-1, keepdim=True), seen + 30
    for _ in range(4):  # decode steps, every one evicting
        got = decoder.step(buffers, token.numpy(), seen[:, None], np.ones((1, 1), bool), seen)
        with torch.no_grad():
            want = tiny_llama(input_ids=token, **forward_cache(tiny_llama, caches["int8"])).logits
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
        token, seen = want[:, -1].argmax(-1, keepdim=True), seen + 1
    state = decoder.state(buffers)
    for li, layer in enumerate(caches["int8"].layers):
        np.testing.assert_allclose(state[f"past.{li}.key_mean"], layer.key_mean.numpy(), atol=1e-6)
        assert np.abs(state[f"past.{li}.key_mean"]).max() > 0.01  # a real mean, not the zeros it began as
        np.testing.assert_allclose(state[f"past.{li}.key_scale"], layer.key_scale.numpy(), rtol=1e-5)
        assert state[f"past.{li}.key_scale"].std() > 0.05  # a real balance, not the ones of a 1-token start
        for h, (off, n) in enumerate(zip(layer.offsets, layer.fill[0].tolist(), strict=True)):
            stored = layer.stored("keys", 0, slice(off, off + n)).numpy()
            np.testing.assert_allclose(
                state[f"past.{li}.key"][0, off : off + n], stored, atol=1e-5, err_msg=f"head {h}"
            )


def test_only_a_quantized_graph_carries_mean_keys_and_key_scales(tiny_llama):
    names = {}
    for kv in ("auto", "int8"):
        profile = _profile(tiny_llama)
        profile.allocation = {"kv_dtype": kv}
        names[kv] = {i.name for i in build_decoder(tiny_llama, profile, progress=False).graph.input}
    assert {"past.0.key_mean", "past.0.key_scale"} <= names["int8"]
    assert not any("key_" in n for n in names["auto"])


def test_a_padded_row_smooths_its_keys_by_its_real_tokens_alone_in_both_runtimes(tiny_llama, tmp_path):
    """Left padding takes no part in a row's mean key and key scale: a padded int8 row ends its
    prefill with the state it has alone, and ONNX Runtime keeps the same state and logits."""
    profile = _profile(tiny_llama)
    profile.allocation = {"kv_dtype": "int8"}
    path = tmp_path / "int8.onnx"
    save_model(build_decoder(tiny_llama, profile, progress=False), path)
    decoder = OnnxDecoder(path)
    enable(tiny_llama)
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    batched, alone = (
        BudgetedCache(CAPS, profile.eviction, "int8"),
        BudgetedCache(CAPS, profile.eviction, "int8"),
    )
    buffers = decoder.new_cache(2)
    got = decoder.step(buffers, ids.numpy(), positions.numpy(), mask.numpy(), np.zeros(2, dtype=np.int64))
    with torch.no_grad():
        want = tiny_llama(
            input_ids=ids, attention_mask=mask.long(), position_ids=positions,
            **forward_cache(tiny_llama, batched),
        ).logits  # fmt: skip
        tiny_llama(input_ids=ids[1:, 6:], **forward_cache(tiny_llama, alone))
    np.testing.assert_allclose(got[mask.numpy()], want[mask].numpy(), atol=1e-4)
    state = decoder.state(buffers)
    for li, (mine, theirs) in enumerate(zip(batched.layers, alone.layers, strict=True)):
        for name in ("key_mean", "key_scale"):
            torch.testing.assert_close(getattr(mine, name)[1:], getattr(theirs, name), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(
                state[f"past.{li}.{name}"], getattr(mine, name).numpy(), atol=1e-5, rtol=1e-5
            )
