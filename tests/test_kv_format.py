"""KV storage formats: the quantize / dequantize reference, the bytes budgets count, and the
runtime's reference store (every token rounded as it enters the cache)."""

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from baklava import kv_format
from baklava.errors import BaklavaError
from baklava.eviction import EvictionConfig
from baklava.profiles.pipeline import allocate
from baklava.runtime import BudgetedCache, enable, prefill
from baklava.runtime.generate import decode_one_token
from baklava.runtime.packed_cache import BudgetedLayer
from tests.conftest import tiny_config
from tests.test_profile_file import make_profile

QUANTIZED = ["fp8", "int8", "int4"]


def _vectors(d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, d, generator=g) * torch.logspace(-3, 1, d)  # channels of very different size
    x[0, 0] = 0  # an all-zero vector keeps a finite scale
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantized_values_are_within_half_a_step_of_the_input(name):
    fmt = kv_format.parse(name)
    x = _vectors()
    payload, scales = kv_format.quantize(x, fmt)
    assert scales.dtype == fmt.scale_dtype and scales.shape == (4, 3, fmt.scales_per_vector(64))
    y = kv_format.dequantize(payload, scales, fmt)
    group_scale = kv_format.group_scales(scales, fmt, fmt.groups(64))  # [4, 3, G]
    step = kv_format._grouped(torch.ones_like(x, dtype=torch.float32), fmt) * group_scale[..., None]
    step = step.reshape(x.shape)
    assert torch.equal(y[0, 0], torch.zeros(64))
    if fmt.rotate:  # int4 quantizes the rotated vector: its bounds hold in that basis
        x, y = kv_format.hadamard(x.float()), kv_format.hadamard(y)
    err = (y - x.float()).abs()
    if name == "fp8":  # 3 mantissa bits: half an ulp relative, or half the smallest subnormal step
        assert (err <= x.float().abs() / 16 + step / 1024 + 1e-7).all()
    else:
        assert (err <= step / 2 * (1 + 1e-3) + 1e-6).all()
    # the largest channel of each vector (group) hits the end of the range: no headroom wasted
    assert float((kv_format._grouped(y.abs(), fmt).amax(-1) / group_scale).max()) == pytest.approx(
        fmt.qmax, rel=1e-3
    )


def test_int4_packs_channel_pairs_low_nibble_first():
    fmt = kv_format.parse("int4")
    rotated = torch.tensor([[7.0, -7.0, 1.0, 0.0] + [0.0] * 28])  # one group, scale 1
    x = kv_format.hadamard(rotated)  # the rotation is its own inverse: quantize sees `rotated`
    payload, scales = kv_format.quantize(x, fmt)
    assert (
        payload.dtype == torch.uint8
        and payload.shape == (1, 16)
        and float(scales[0, 0].view(torch.float16)) == 1.0
    )
    assert payload[0, :2].tolist() == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]
    assert payload[0, 2:].tolist() == [8 | (8 << 4)] * 14  # zeros
    torch.testing.assert_close(kv_format.dequantize(payload, scales, fmt), x, atol=1e-6, rtol=0)


def test_int4_group_scales_are_a_float16_top_and_a_byte_a_group():
    fmt = kv_format.parse("int4")
    rotated = torch.zeros(1, 128)
    for group, absmax in enumerate((7.0, 3.5, 0.7, 0.0)):  # scales 1, 1/2, 1/10 and an empty group
        rotated[0, 32 * group] = absmax
    payload, scales = kv_format.quantize(kv_format.hadamard(rotated), fmt)
    assert scales.dtype == torch.int16 and scales.shape == (1, 3)  # 6 bytes, where 4 float16 took 8
    assert float(scales[0, :1].view(torch.float16)) == 1.0
    assert scales[0, 1:].contiguous().view(torch.uint8).tolist() == [255, 127, 25, 0]  # 256 * s - 1
    got = kv_format.group_scales(scales, fmt, 4)
    assert got.tolist() == [[1.0, 0.5, 26 / 256, 1 / 256]]  # exact: top x (code + 1) / 256
    # 0.7 / (26 / 256) = 6.89 rounds to 7: the group's largest channel comes back within half a step
    back = kv_format.hadamard(kv_format.dequantize(payload, scales, fmt))
    assert torch.allclose(back[0, ::32], torch.tensor([7.0, 3.5, 7 * 26 / 256, 0.0]), atol=1e-6)


def test_the_rotation_is_its_own_inverse_and_keeps_dot_products():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    torch.testing.assert_close(kv_format.hadamard(kv_format.hadamard(k)), k, atol=1e-6, rtol=0)
    torch.testing.assert_close((kv_format.hadamard(q) * kv_format.hadamard(k)).sum(-1), (q * k).sum(-1))
    spike = torch.zeros(1, 64)
    spike[0, 5] = 8.0  # one outlier channel is spread evenly over all of them
    assert torch.allclose(kv_format.hadamard(spike).abs(), torch.full((1, 64), 1.0))


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_a_dequantized_vector_quantizes_to_itself(name):
    fmt = kv_format.parse(name)
    once = kv_format.round_trip(_vectors().float(), fmt)
    assert torch.equal(kv_format.round_trip(once, fmt), once)


def test_bytes_a_format_costs_and_what_memory_budgets_buy():
    bf16, int8, fp8, int4 = (kv_format.parse(n) for n in ("auto", "int8", "fp8", "int4"))
    for d in (64, 128):
        x = torch.zeros(1, d)
        for fmt in (int8, fp8, int4):
            payload, scales = kv_format.quantize(x, fmt)
            assert fmt.vector_bytes(d) == payload.numel() * payload.element_size() + scales.numel() * 2
    # Llama-3-8B's head dim: rows in a fixed memory against bf16 (issue 23: >= 1.9x, >= 3.5x)
    assert bf16.vector_bytes(128) / int8.vector_bytes(128) == pytest.approx(256 / 130)
    assert bf16.vector_bytes(128) / int4.vector_bytes(128) == pytest.approx(256 / 70)  # 64 + 3 float16 words
    assert int4.vector_bytes(64) == 32 + 4  # top and one word of two codes
    assert int4.vector_bytes(32) == 16 + 2  # one group: its scale is top, no code
    assert kv_format.element_bytes("float32", 64, 2) == 4 and kv_format.element_bytes("auto", 64, 4) == 4
    with pytest.raises(BaklavaError, match="unknown KV dtype 'int3'"):
        kv_format.parse("int3")
    with pytest.raises(BaklavaError, match="divisible by 32"):
        kv_format.quantize(torch.zeros(1, 16), int4)
    with pytest.raises(BaklavaError, match="power-of-two head dimension, got 48"):
        kv_format.quantize(torch.zeros(1, 48), int4)


def test_memory_budgets_count_the_formats_bytes_and_the_profile_keeps_the_format():
    profile = make_profile()  # head_dim 16: int8 = 16 + 2 bytes a vector, bf16 = 32
    got = {n: allocate(profile, "16KiB", kv_dtype=n, search=False, progress=False) for n in ("auto", "int8")}
    assert got["auto"].total_tokens == 16384 // (2 * 32)
    assert got["int8"].total_tokens == 16384 // (2 * 18)
    with pytest.raises(BaklavaError, match="divisible by 32"):  # head_dim 16 holds no int4 group
        allocate(profile, "16KiB", kv_dtype="int4", search=False, progress=False)
    assert got["int8"].kv_format == "int8" and got["auto"].kv_format == "auto"
    assert BudgetedCache.from_profile(got["int8"]).kv_format.name == "int8"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(head_dim=32)).eval()
    enable(model)
    return model


def _prefill_and_decode(model, name, storage, monkeypatch, steps=6):
    monkeypatch.setattr(BudgetedLayer, "quantized_storage", storage)
    caps = np.full((2, 2), 24)  # the 40-token prompt evicts, and so does every decode step
    ids = torch.randint(4, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = BudgetedCache(caps, EvictionConfig(sink=2, window=4), kv_format=name)
    logits = [prefill(model, cache, ids, chunk=16).float()]
    for _ in range(steps):  # the one-token path (packed_decode): shifts and overwrites slots
        logits.append(decode_one_token(model, cache, logits[-1].argmax(-1, keepdim=True)).float())
    return torch.cat(logits), cache


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_slots_hold_payload_and_give_back_the_reference_store(model, name, monkeypatch):
    """Real storage (payload + scales) against the reference store (the model's dtype, each token
    rounded on entry): the same logits bit for bit through an evicting chunked prefill and decode
    steps, the same values read back, at the format's bytes."""
    fmt = kv_format.parse(name)
    want_logits, ref = _prefill_and_decode(model, name, False, monkeypatch)
    got_logits, got = _prefill_and_decode(model, name, True, monkeypatch)
    assert torch.equal(got_logits, want_logits)
    for mine, theirs in zip(got.layers, ref.layers, strict=True):
        assert mine.slot_names == ("keys", "values", "key_scales", "value_scales")
        assert mine.keys.dtype == (torch.int8 if name == "int8" else torch.uint8)
        assert mine.keys.shape[-1] == 32 * fmt.bits // 8 and mine.key_scales.dtype == fmt.scale_dtype
        assert torch.equal(mine.positions, theirs.positions) and torch.equal(mine.fill, theirs.fill)
        assert torch.equal(mine.stored("keys"), theirs.keys) and torch.equal(
            mine.stored("values"), theirs.values
        )
        on_grid = kv_format.round_trip(theirs.keys.float(), fmt)
        assert torch.equal(on_grid, theirs.keys.float())  # the reference holds values on the format's grid
    slots = 2 * 48  # layers x sum(cap)
    # 34 bytes a vector for int8 / fp8, 18 for int4 (one group: top alone)
    assert got.kv_bytes() == slots * 2 * fmt.vector_bytes(32)
    assert ref.kv_bytes() == slots * 2 * 32 * 4  # the tiny model runs in float32
    plain_logits, _ = _prefill_and_decode(model, "auto", True, monkeypatch)
    first = slice(0, 1)  # the prompt's next-token logits (greedy decode steps may part ways after)
    drift = (got_logits[first] - plain_logits[first]).abs().max() / plain_logits[first].abs().max()
    assert 0 < drift < (0.2 if name == "int4" else 0.05)


def test_the_kernel_benchmark_counts_payload_and_scales():
    from baklava.bench.kv_dtype_speed import markdown, stored

    keys = torch.randn(2, 10, 128, dtype=torch.bfloat16)
    got = {n: stored(keys, keys, n)["nbytes"] for n in ("bf16", "int8", "int4")}
    assert got == {"bf16": 2 * 2 * 10 * 256, "int8": 2 * 2 * 10 * 130, "int4": 2 * 2 * 10 * 70}
    row = dict(kv_dtype="int8", batch=2, context=64, budget=0.3, kv_mib=0.1, ms=1.0, TBps=1.0)
    row |= dict(speedup_vs_bf16=1.9, bytes_vs_bf16=1.97, max_abs_diff_vs_bf16=0.01)
    assert "| int8 |  | 0.1 | 1.0 | 1.0 | 1.9x | 1.97x | 0.01 |" in markdown([row], {"gpu": "x", "date": "d"})


def test_the_kernel_benchmark_sweeps_launches_and_names_each_formats_fastest():
    from baklava.bench.kv_dtype_speed import Launch, markdown, parse_launches
    from baklava.errors import BaklavaError

    assert parse_launches("64x4x2, 128X8x3") == [Launch(64, 4, 2), Launch(128, 8, 3)]
    mma = parse_launches("64x4x2,mma16")[1]
    assert (str(mma), mma.mma, mma.per_sm, mma.warps) == ("mma16", True, 16, 1)
    assert mma.runs("int8") and mma.runs("fp8") and not mma.runs("bf16") and not mma.runs("int4")
    assert (str(parse_launches("mma6x4")[0]), parse_launches("mma6x4")[0].stages) == ("mma6x4", 4)
    ring = parse_launches("mma7s1x3c")[0]  # 16-slot chunks, three of them, contiguous tiles
    assert (ring.per_sm, ring.sub, ring.stages, ring.interleave, str(ring)) == (7, 1, 3, False, "mma7s1x3c")
    assert (parse_launches("mma8")[0].sub, parse_launches("mma8")[0].stages) == (2, 2)  # what is deployed
    fewest = parse_launches("mma8m2")[0]  # a balanced table of programs of at least two chunks
    assert (fewest.per_sm, fewest.min_chunks, str(fewest), parse_launches("mma8")[0].min_chunks) == (
        8,
        2,
        "mma8m2",
        8,
    )
    caps = [4096, 1024, 512, 256, 128, 64, 32, 16]
    most = {m: parse_launches(f"mma8m{m}")[0].table(caps, 1, 132, "cpu") for m in (1, 2, 8)}
    chunks = sum(-(-c // 32) for c in caps)  # 192 chunks of 32 slots; one sequence has room for all
    # fewer chunks a program: more programs (a program for every M chunks)
    assert [len(most[m].tensors[0]) for m in (8, 2, 1)] == [chunks // 8, chunks // 2, chunks]
    for bad in (
        "64x4",
        "64x4x0",
        "96x4x2",
        "64x3x2",
        "8x4x2",
        "64x4x2,64x4x2",
        "fast",
        "mma",
        "mma0",
        "mmax",
        "mma8x1",
        "mma8s0",
        "mma8s2x",
        "mma8m0",
        "mma8m",
    ):
        with pytest.raises(BaklavaError):
            parse_launches(bad)
    common = dict(
        batch=8, context=64, budget=0.3, kv_mib=1.0, TBps=1.0, bytes_vs_bf16=1.0, max_abs_diff_vs_bf16=0
    )
    rows = [
        dict(common, kv_dtype="bf16", launch="64x4x2", ms=0.09, speedup_vs_bf16=1.0),
        dict(common, kv_dtype="bf16", launch="128x8x2", ms=0.10, speedup_vs_bf16=0.9),
        dict(common, kv_dtype="int8", launch="64x4x2", ms=0.095, speedup_vs_bf16=0.95),
        dict(common, kv_dtype="int8", launch="128x8x2", ms=0.05, speedup_vs_bf16=1.8),
    ]
    table = markdown(rows, {})
    assert "speedup vs bf16 64x4x2 |" in table
    assert "- bf16: 64x4x2, 0.09 ms, 1.0x bf16 64x4x2" in table
    assert "- int8: 128x8x2, 0.05 ms, 1.8x bf16 64x4x2" in table
