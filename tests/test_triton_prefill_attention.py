"""The prefill-attention kernels against the SDPA path of an unpadded chunk (their reference).

A layer's stored slots (ragged capacities, heads full and empty) and a new chunk, GQA: the
kernels' output, log-sum-exp and SnapKV masses against per-head PyTorch attention over
``[stored | chunk]``; then whole chunked prefills through ``BudgetedLayer.attend`` with and
without the kernels keep the same tokens. Runs on a CUDA device, or in Triton's interpreter.
"""

from types import SimpleNamespace

import pytest
import torch

from baklava.eviction import EvictionConfig
from baklava.runtime import kv_slots
from baklava.runtime.packed_cache import BudgetedLayer
from tests.triton_env import DEVICE

pytest.importorskip("triton", reason="Triton is not installed")

from baklava.kernels.prefill_attention import observation_masses, prefill_attention  # noqa: E402

D = 32


def _reference(query, layer, k_new, v_new, scale, obs, valid=None):
    """Per KV head: softmax over [stored slots | causal chunk] in fp32; out, lse and masses.
    ``valid [B, S]``: padded tokens are no key, padded queries pay no mass (their rows are
    NaN where they see no key at all)."""
    batch, q_heads, s, _ = query.shape
    group = q_heads // layer.num_heads
    valid = torch.ones(batch, s, dtype=torch.bool, device=query.device) if valid is None else valid
    outs, lses, masses = [], [], []
    for h, off in enumerate(layer.offsets):
        n = int(layer.fill[0, h])
        k = torch.cat([layer.keys[:, off : off + n], k_new[:, h]], 1).float()  # [B, n + s, D]
        v = torch.cat([layer.values[:, off : off + n], v_new[:, h]], 1).float()
        q = query[:, h * group : (h + 1) * group].float()  # [B, g, s, D]
        logits = q @ k[:, None].transpose(-1, -2) * scale  # [B, g, s, n + s]
        visible = torch.ones(s, n + s, dtype=torch.bool, device=q.device).tril(n)
        keys_ok = torch.cat([torch.ones(batch, n, dtype=torch.bool, device=q.device), valid], 1)
        logits = logits.masked_fill(~(visible & keys_ok[:, None, None, :]), float("-inf"))
        lse = torch.logsumexp(logits, -1)
        probs = torch.exp(logits - lse[..., None])
        outs.append(probs @ v[:, None])
        lses.append(lse)
        paid = (probs * valid[:, None, :, None]).nan_to_num()[:, :, s - obs :]
        masses.append(paid.sum(2).mean(1))  # [B, n + s]
    return torch.cat(outs, 1), torch.cat(lses, 1), masses


@pytest.mark.parametrize(
    ("caps", "fills", "chunk"), [([40, 7, 90], [40, 0, 33], 21), ([16, 16], [5, 16], 70)]
)
def test_kernels_match_attention_over_stored_slots_and_the_chunk(caps, fills, chunk):
    gen = torch.Generator().manual_seed(len(caps) + chunk)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    batch, heads, group, obs = 2, len(caps), 3, 8
    layer = BudgetedLayer(caps, EvictionConfig())
    empty = torch.empty(batch, heads, 0, D, dtype=torch.float16, device=DEVICE)
    layer.lazy_initialization(empty, empty)
    layer.keys.copy_(rand(batch, layer.total, D))
    layer.values.copy_(rand(batch, layer.total, D))
    layer.fill.copy_(torch.tensor([fills] * batch))
    query = rand(batch, heads * group, chunk, D)
    k_new, v_new = rand(batch, heads, chunk, D), rand(batch, heads, chunk, D)
    offsets = torch.tensor(layer.offsets, dtype=torch.int32, device=DEVICE)
    scale = D**-0.5

    out, lse = prefill_attention(
        query, layer.keys, layer.values, k_new, v_new, layer.fill, offsets, scale, block_n=16
    )
    before = torch.rand(batch, layer.total, generator=gen).to(DEVICE)
    scores = before.clone()
    new = observation_masses(
        query, layer.keys, k_new, layer.fill, offsets, lse, scores, max(caps), obs, scale
    )
    want_out, want_lse, want_masses = _reference(query, layer, k_new, v_new, scale, obs)
    torch.testing.assert_close(out.transpose(1, 2).float(), want_out, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=0)
    _assert_masses(layer, fills, before, scores, new, want_masses, atol=1e-3)


def _stored_layer(caps, fills, kv_format, batch, rand):
    """A layer whose slots hold random tokens in ``kv_format`` (encoded as the cache stores
    them, unsmoothed: the kernels never see the smoothing), ``fills`` of each head live in every row."""
    layer = BudgetedLayer(caps, EvictionConfig(), kv_format)
    layer.smooth_keys = False
    empty = torch.empty(batch, len(caps), 0, D, dtype=torch.float16, device=DEVICE)
    layer.lazy_initialization(empty, empty)
    tokens = rand(batch, 1, layer.total, D)
    _, _, _, slots = kv_slots.encode(layer, tokens, tokens, rand(batch, 1, layer.total, D))
    for slot_name, value in slots.items():
        getattr(layer, slot_name).copy_(value[:, 0])
    layer.fill.copy_(torch.tensor([fills] * batch))
    return layer


@pytest.mark.parametrize("kv_format", [None, "int8"])
def test_a_padded_chunk_masks_its_padding_in_the_kernels(kv_format):
    """Left padding (row 0: 6 padded tokens; row 1: none): padded tokens are no key to anyone,
    real queries match the reference, padded ones stay finite (zeros where a head holds nothing:
    head 1), and neither pays nor receives SnapKV mass."""
    caps, fills, chunk, pad = [40, 7, 90], [40, 0, 33], 21, 6
    gen = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    batch, heads, group, obs = 2, len(caps), 3, 8
    layer = _stored_layer(caps, fills, kv_format, batch, rand)
    valid = torch.ones(batch, chunk, dtype=torch.bool, device=DEVICE)
    valid[0, :pad] = False
    query = rand(batch, heads * group, chunk, D)
    k_new, v_new = rand(batch, heads, chunk, D), rand(batch, heads, chunk, D)
    keys, values = kv_slots.payload(layer, "keys"), kv_slots.payload(layer, "values")
    quantized = dict(kv_format=kv_format, key_scales=layer.key_scales)
    args = (layer.fill, layer.device_offsets, D**-0.5)
    out, lse = prefill_attention(
        query, keys, values, k_new, v_new, *args,
        value_scales=layer.value_scales, block_n=16, valid=valid, **quantized,
    )  # fmt: skip
    before = torch.rand(batch, layer.total, generator=gen).to(DEVICE)
    scores = before.clone()
    new = observation_masses(
        query, keys, k_new, *args[:2], lse, scores, max(caps), obs, D**-0.5, valid=valid, **quantized
    )
    plain = SimpleNamespace(
        keys=layer.stored("keys"), values=layer.stored("values"), offsets=layer.offsets, fill=layer.fill,
        num_heads=heads,
    )  # fmt: skip
    want_out, want_lse, want_masses = _reference(query, plain, k_new, v_new, D**-0.5, obs, valid)
    got = out.transpose(1, 2).float()  # [B, H_q, S, D]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1], want_out[1], atol=5e-3, rtol=0)
    torch.testing.assert_close(got[0, :, pad:], want_out[0, :, pad:], atol=5e-3, rtol=0)
    torch.testing.assert_close(lse[0, :, pad:], want_lse[0, :, pad:], atol=2e-3, rtol=0)
    heads_with_slots = [q for q in range(heads * group) if fills[q // group]]  # padded queries see them
    torch.testing.assert_close(
        got[0, heads_with_slots, :pad], want_out[0, heads_with_slots, :pad], atol=5e-3, rtol=0
    )
    assert torch.equal(got[0, group : 2 * group, :pad], torch.zeros_like(got[0, group : 2 * group, :pad]))
    _assert_masses(layer, fills, before, scores, new, want_masses, atol=2e-3)
    assert torch.equal(new[0, :, :pad], torch.zeros_like(new[0, :, :pad]))


def _assert_masses(layer, fills, before, scores, new, want_masses, atol):
    """Stored slots' masses added to their scores (slots past the fill untouched), new ones returned."""
    for h, (off, n) in enumerate(zip(layer.offsets, fills, strict=True)):
        torch.testing.assert_close(
            scores[:, off : off + n] - before[:, off : off + n], want_masses[h][:, :n], atol=atol, rtol=0
        )
        end = off + layer.capacities[h]
        assert torch.equal(scores[:, off + n : end], before[:, off + n : end])
        torch.testing.assert_close(new[:, h], want_masses[h][:, n:], atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
def test_kernels_read_quantized_slots_as_their_dequantized_values(name):
    """Payload + scales read in registers against the same reference over the values the slots
    give back (``kv_format.dequantize``)."""
    caps, fills, chunk = [40, 7, 90], [40, 0, 33], 21
    gen = torch.Generator().manual_seed(5)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    batch, heads, group, obs = 2, len(caps), 3, 8
    layer = _stored_layer(caps, fills, name, batch, rand)
    query = rand(batch, heads * group, chunk, D)
    k_new, v_new = rand(batch, heads, chunk, D), rand(batch, heads, chunk, D)
    scale = D**-0.5
    quantized = dict(kv_format=name, key_scales=layer.key_scales)
    keys, values = kv_slots.payload(layer, "keys"), kv_slots.payload(layer, "values")
    args = (layer.fill, layer.device_offsets, scale)
    out, lse = prefill_attention(
        query,
        keys,
        values,
        k_new,
        v_new,
        *args,
        value_scales=layer.value_scales,
        block_n=16,
        **quantized,
    )
    before = torch.rand(batch, layer.total, generator=gen).to(DEVICE)
    scores = before.clone()
    new = observation_masses(query, keys, k_new, *args[:2], lse, scores, max(caps), obs, scale, **quantized)
    plain = SimpleNamespace(
        keys=layer.stored("keys"),
        values=layer.stored("values"),
        offsets=layer.offsets,
        fill=layer.fill,
        num_heads=heads,
    )
    want_out, want_lse, want_masses = _reference(query, plain, k_new, v_new, scale, obs)
    torch.testing.assert_close(out.transpose(1, 2).float(), want_out, atol=5e-3, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=0)
    _assert_masses(layer, fills, before, scores, new, want_masses, atol=2e-3)


@pytest.mark.parametrize(
    ("policy", "kv_format", "caps", "smooth"),
    [
        ("h2o", None, [3, 11, 20], False),
        ("ring", None, [3, 11, 20], False),
        ("h2o", "int8", [3, 11, 20], False),
        ("h2o", "int4", [3, 11, 20], False),
        ("h2o", None, [37, 40, 64], False),  # room for every chunk: appended in place
        ("h2o", "int8", [37, 40, 64], False),
        ("h2o", "int8", [3, 11, 20], True),  # keys stored minus their head's mean
        ("h2o", "int4", [37, 40, 64], True),
    ],
)
def test_chunked_prefill_with_the_kernel_keeps_what_the_sdpa_path_keeps(policy, kv_format, caps, smooth):
    """Three unpadded chunks through ``attend`` (commit kernels on), by the GPU route
    (``kernel_prefill``: prefill kernels, no host sync) or by SDPA per head: same outputs, same
    kept tokens, heads evicting or appending, keys smoothed or not."""
    batch, q_heads = 2, 6
    gen = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    eviction = EvictionConfig(sink=1, window=2, policy=policy, obs_window=4, pool_kernel=3)
    layers = {}
    for kernel in (False, True):
        layers[kernel] = BudgetedLayer(caps, eviction, kv_format)
        layers[kernel].decode_kernels = "triton"
        layers[kernel].prefill_kernel = kernel
        layers[kernel].smooth_keys = smooth
    for chunk in (12, 16, 9):
        k, v, q = (
            rand(batch, 3, chunk, D) + 4 * smooth,
            rand(batch, 3, chunk, D),
            rand(batch, q_heads, chunk, D),
        )
        outs = []
        for layer in layers.values():
            layer.update(k, v)
            outs.append(layer.attend(q, None, D**-0.5)[0].float())
        torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=0)
    ref, got = layers[False], layers[True]
    assert torch.equal(ref.fill, got.fill) and ref.fill.tolist() == [[min(c, 37) for c in caps]] * batch
    assert torch.equal(ref.positions, got.positions)
    for name in ref.slot_names:
        assert torch.equal(getattr(ref, name), getattr(got, name)), name
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-3, rtol=0)
    if smooth:  # the mean of the first chunk's keys, kept by both routes
        assert torch.equal(got.key_mean, ref.key_mean)
        assert got.key_mean.min() > 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync needs a device to wait for")
def test_the_gpu_route_never_waits_for_the_device():
    """Three chunks (the first builds the layer and its head tables, the later ones evict) queue
    every kernel without a host sync: ``torch.cuda.set_sync_debug_mode("error")`` raises on any."""
    gen = torch.Generator().manual_seed(5)
    rand = lambda *s: torch.randn(*s, generator=gen).half().to(DEVICE)  # noqa: E731
    chunks = [(rand(1, 3, n, D), rand(1, 3, n, D), rand(1, 6, n, D)) for n in (12, 16, 9)]
    for checked in (False, True):  # the first pass compiles the kernels
        layer = BudgetedLayer([3, 11, 20], EvictionConfig(sink=1, window=2, obs_window=4), "int8")
        layer.decode_kernels, layer.prefill_kernel = "triton", True
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else 0)
        try:
            for k, v, q in chunks:
                layer.update(k, v)
                layer.attend(q, None, D**-0.5)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert layer.fill.tolist() == [[3, 11, 20]]


# run without the interpreter (its jit functions cannot be compiled), as prefill_attention
# launches the kernels for Llama-3-8B shapes
_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from baklava.kernels import prefill_attention as kernels
from baklava.kernels.decode_attention import _quant_mode

kv_format, padded = (None if sys.argv[1] == "none" else sys.argv[1]), sys.argv[2] == "padded"
quant, scale_group, _ = _quant_mode(kv_format, 128)
slot = {None: "*bf16", "int8": "*i8", "int4": "*u8"}[kv_format]
scales = "*i16" if kv_format == "int4" else "*fp16"  # int4: two-level scales as int16 words
pointers = dict(Q="*bf16", K=slot, V=slot, KS=scales, VS=scales, KN="*bf16", VN="*bf16", FILL="*i32",
                OFFSETS="*i32", OUT="*bf16", LSE="*fp32", VALID="*i8")
constants = dict(GROUP=4, G_P2=4, D=128, BLOCK_Q=32, BLOCK_N=128, QUANT=quant, SCALE_GROUP=scale_group,
                 PADDED=padded)
mass_pointers = dict(Q="*bf16", K=slot, KS=scales, KN="*bf16", FILL="*i32", OFFSETS="*i32", LSE="*fp32",
                     SCORE="*fp32", NEW_MASS="*fp32", VALID="*i8")
mass_constants = dict(GROUP=4, D=128, W=32, BLOCK_N=64, QUANT=quant, SCALE_GROUP=scale_group, PADDED=padded)
launches = [(kernels._attention_kernel, pointers, constants, 8), (kernels._mass_kernel, mass_pointers, mass_constants, 4)]
for fn, ptrs, consts, warps in launches:
    signature = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in ("qk_scale", "scale") else "i32")
                 for n in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], fn.__name__
"""


@pytest.mark.parametrize(
    ("kv_format", "padding"),
    [("none", "unpadded"), ("none", "padded"), ("int8", "padded"), ("int4", "unpadded")],
)
def test_the_prefill_kernels_compile_for_hopper(kv_format, padding):
    """The interpreter runs what the compiler refuses (a loop variable reused with another type
    after a branch, say): compile the attention and mass kernels for sm_90 with Triton's own
    ptxas (no GPU needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER, kv_format, padding],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
