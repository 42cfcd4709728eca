"""`baklava-bench speed` / `memory`: the parts that run without a GPU (sizes, search, errors)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from baklava.bench.cli import bench
from baklava.bench.gpu_decode import model_shape, uneven_capacities, weight_bytes_read
from baklava.bench.memory import cache_bytes, largest_batch


@pytest.mark.parametrize(("budget", "context"), [(0.3, 16384), (0.1, 4096), (0.05, 100), (1.0, 512)])
def test_uneven_capacities_spend_the_budget_exactly(budget, context):
    caps = uneven_capacities(32, 8, context, budget)
    assert caps.shape == (32, 8)
    assert caps.sum() == round(budget * context * 32 * 8)
    assert caps.min() >= 1 and caps.max() <= context
    if budget < 1:
        assert caps.max() > caps.min()  # uneven, like an allocation


def test_cache_bytes_are_the_packed_tensors(tiny_llama):
    layers, kv_heads, _, head_dim = model_shape(tiny_llama)
    caps = np.array([[3, 10], [7, 1]])
    row = cache_bytes(tiny_llama, caps, batch=4)
    assert row["kv_bytes"] == 4 * caps.sum() * 2 * head_dim * 4  # fp32 keys and values
    # positions int32 + scores fp32 per slot, fill per head, valid_seen per row
    assert row["metadata_bytes"] == 4 * caps.sum() * (4 + 4) + layers * (4 * kv_heads * 8 + 4 * 8)


def test_largest_batch_is_checked_by_allocation(tiny_llama):
    caps = np.array([[30, 10], [20, 4]])
    per_seq = cache_bytes(tiny_llama, caps, 1)["total_bytes"]
    limit = 7 * per_seq + per_seq // 2
    got = largest_batch(tiny_llama, caps, limit)
    assert got["batch"] == 7 and got["bytes_per_sequence"] == per_seq
    assert (
        cache_bytes(tiny_llama, caps, 7)["total_bytes"]
        <= limit
        < cache_bytes(tiny_llama, caps, 8)["total_bytes"]
    )
    # a third of the slots: three times the sequences, within rounding of the bookkeeping
    small = largest_batch(tiny_llama, np.array([[10, 3], [7, 1]]), limit)
    assert small["batch"] >= 3 * 7


def test_weight_bytes_read_skip_an_untied_embedding(tiny_llama):
    total = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())
    embed = tiny_llama.get_input_embeddings().weight
    tied = embed is tiny_llama.get_output_embeddings().weight
    want = total if tied else total - embed.numel() * embed.element_size()
    assert weight_bytes_read(tiny_llama) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("command", ["speed", "memory", "prefill"])
def test_gpu_benchmarks_say_they_need_a_gpu(command, tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        bench, [command, "--out", str(out)], standalone_mode=False, catch_exceptions=True
    )
    assert "no CUDA device" in str(result.exception)
    assert not out.exists()


def test_the_meta_device_counts_llama_8b_caches_without_a_gpu(tmp_path):
    import json

    out = tmp_path / "memory.json"
    args = ["memory", "--device", "meta", "--budgets", "0.3", "--kv-dtypes", "auto,int4", "--out", str(out)]
    refused = CliRunner().invoke(bench, args, standalone_mode=False, catch_exceptions=True)
    assert "--no-prefill" in str(refused.exception) and not out.exists()
    result = CliRunner().invoke(bench, [*args, "--no-prefill"], catch_exceptions=False)
    assert result.exit_code == 0
    bf16, int4 = json.loads(out.read_text())["budgets"]
    slots = bf16["slots_per_sequence"]
    assert slots == round(0.3 * 32768 * 32 * 8)  # Llama-3-8B: 32 layers of 8 KV heads
    assert bf16["kv_bytes"] == slots * 2 * 128 * 2
    assert int4["kv_bytes"] == slots * 2 * (64 + 3 * 2)  # nibbles + top and four group bytes
    # positions int32 + scores fp32 a slot, fill int64 a head, valid_seen int64 a layer
    assert bf16["metadata_bytes"] == int4["metadata_bytes"] == slots * 8 + 32 * (8 * 8 + 8)
    per_seq = [row["total_bytes"] for row in (bf16, int4)]
    assert [row["largest_batch"]["batch"] for row in (bf16, int4)] == [16 * 2**30 // b for b in per_seq]
    assert [row["largest_batch"]["batch"] for row in (bf16, int4)] == [13, 46]  # 3.54x (issue 23: >= 3.5x)


def test_bad_sizes_and_budgets_are_one_line_errors(tmp_path):
    from baklava.bench.cli import bench_main

    for args in (
        ["memory", "--kv-memory", "3x"],
        ["memory", "--kv-memory", "0.3"],
        ["speed", "--budgets", "0.3,2"],
        ["prefill", "--chunks", "none,many"],
        ["memory", "--kv-dtypes", "auto,int3"],
        ["engine", "--kv-dtypes", "int3"],
        ["kv-dtype", "--launches", "64x4"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench_main(args)
        assert exit_info.value.code == 2


def test_budget_gains_compare_each_layer_variant_with_its_own_full_cache():
    from baklava.bench.gpu_decode import budget_gains

    rows = [
        {"budget": "transformers", "kv_bytes": 100, "step_ms": 90.0},
        {"budget": 1.0, "fused": False, "kv_bytes": 100, "step_ms": 16.0},
        {"budget": 0.3, "fused": False, "kv_bytes": 30, "step_ms": 11.0},
        {"budget": 1.0, "fused": True, "kv_bytes": 100, "step_ms": 13.0},
        {"budget": 0.3, "fused": True, "kv_bytes": 30, "step_ms": 8.0},
    ]
    gains = budget_gains(rows, weights=50)
    assert sorted(gains) == ["0.3", "0.3 fused"]
    assert gains["0.3"]["bytes_ratio"] == pytest.approx(150 / 80)
    assert gains["0.3"]["speedup_vs_1.0"] == pytest.approx(16 / 11)
    assert gains["0.3 fused"]["speedup_over_bytes_ratio"] == pytest.approx((13 / 8) / (150 / 80))


def test_a_quantized_format_is_allocated_at_its_bytes_and_fits_more_sequences(tiny_llama):
    layers, kv_heads, _, head_dim = model_shape(tiny_llama)
    caps = np.array([[30, 10], [20, 4]])
    row = cache_bytes(tiny_llama, caps, 2, "int8")
    assert row["kv_bytes"] == 2 * caps.sum() * 2 * (head_dim + 2)  # int8 payload + a float16 scale
    limit = 7 * cache_bytes(tiny_llama, caps, 1)["total_bytes"]
    plain, int8 = (largest_batch(tiny_llama, caps, limit, fmt)["batch"] for fmt in (None, "int8"))
    assert plain == 7
    # fp32 vectors of head_dim 16 cost 64 bytes, int8 ones 18; positions and scores stay 8 a slot
    assert int8 == limit // cache_bytes(tiny_llama, caps, 1, "int8")["total_bytes"] == 21


def test_the_engine_bench_reads_served_artifacts_of_one_model(tiny_model_dir, tmp_path):
    import json

    from baklava.bench.serve_cli import _read_artifacts
    from baklava.cli import export_main
    from baklava.errors import BaklavaError

    paths = []
    for budget in ("1.0", "0.3"):
        paths.append(tmp_path / budget)
        try:
            export_main(["--model", str(tiny_model_dir), "--budget", budget, "--out", str(paths[-1]),
                         "--samples", "1", "--seq-len", "64", "--no-search", "--no-plot", "--no-onnx"])  # fmt: skip
        except SystemExit as e:
            assert not e.code, "baklava-export failed"
    artifacts = _read_artifacts(",".join(map(str, paths)))
    assert [round(a.manifest["budget"]["fraction"], 3) for a in artifacts] == [1.0, 0.3]
    assert artifacts[1].profile.capacities.sum() < artifacts[0].profile.capacities.sum()
    with pytest.raises(BaklavaError, match="not a BaKlaVa artifact"):
        _read_artifacts(f"{paths[0]},{tmp_path}")
    manifest = paths[1] / "manifest.json"  # the same profile, said to be another model's
    body = json.loads(manifest.read_text())
    body["model"]["spec"] = "qwen2.5-coder-0.5b"
    manifest.write_text(json.dumps(body))
    with pytest.raises(BaklavaError, match="of one model"):
        _read_artifacts(",".join(map(str, paths)))
