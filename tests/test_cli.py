"""The command line on a tiny local model: artifacts, and one-line errors that write nothing."""

import json
import subprocess
import sys

import pytest
import torch

from baklava.cli import export_main, profile_main, run_main

FAST = ["--samples", "1", "--seq-len", "64", "--min-cap", "4"]


def call(main, argv, capfd):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_error(code, err, prog, *needles):
    assert code not in (0, None)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_export_then_run(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "art"
    argv = ["--model", tiny_model_dir, "--budget", "0.3", "--out", out, *FAST, "--search-context", "96"]
    code, stdout, err = call(export_main, argv, capfd)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "profile.json",
        "profile.png",
        "tokenizer",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    profile = json.loads((out / "profile.json").read_text())
    caps = profile["capacities"]
    assert sum(map(sum, caps)) == round(0.3 * 256 * 4) == manifest["budget"]["total_tokens"]
    search = profile["allocation"]["search"]
    assert search["candidates"]  # the perplexity search ran
    assert {c["floor_frac"] for c in search["candidates"] if c["sharpness"]} == {0.5}  # default floors
    heads = len(caps) * len(caps[0])
    assert min(map(min, caps)) >= int(0.5 * manifest["budget"]["total_tokens"] / heads)  # half the even share
    assert manifest["graphs"]["decoder"]["file"] == "model.onnx"
    assert manifest["backends"] == ["torch", "onnxruntime"]
    assert manifest["budget"]["kv_bytes_per_sequence"] == 307 * 2 * 16 * 4

    outputs = {}
    for backend in ("torch", "onnxruntime"):
        argv = [
            out,
            "--prompt",
            "the a of",
            "--prompt",
            "to and",
            "--no-chat",
            "--json",
            "--max-new-tokens",
            "6",
            "--backend",
            backend,
        ]
        code, stdout, err = call(run_main, argv, capfd)
        assert code == 0, err
        outputs[backend] = [json.loads(line) for line in stdout.splitlines()]
    assert [r["prompt"] for r in outputs["torch"]] == ["the a of", "to and"]
    assert all(1 <= len(r["token_ids"]) <= 6 for r in outputs["torch"])
    assert outputs["onnxruntime"] == outputs["torch"]


def test_profile_command_with_plot(tiny_model_dir, tmp_path, capfd):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    code, _, err = call(profile_main, ["--model", tiny_model_dir, "--out", out, "--plot", png, *FAST], capfd)
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["capacities"] is None and len(d["scores"]["kv_head"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_searches_the_floors_asked_for(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "p.json"
    argv = ["--model", tiny_model_dir, "--out", out, "--budget", "0.3", *FAST, "--search-context", "96"]
    code, _, err = call(profile_main, [*argv, "--search-floors", "0.2,0.4"], capfd)
    assert code == 0, err
    search = json.loads(out.read_text())["allocation"]["search"]
    assert sorted({c["floor_frac"] for c in search["candidates"]}) == [0.0, 0.2, 0.4]  # 0.0: uniform
    code, _, err = call(profile_main, [*argv, "--search-floors", "0.2,1.5"], capfd)
    assert code == 2 and "--search-floors" in err and "[0, 1]" in err


@pytest.mark.parametrize(
    ("budget", "needle"),
    [("0", "out of range"), ("1.5", "out of range"), ("abc", "not a fraction"), ("-3", "out of range")],
)
def test_bad_budget(tiny_model_dir, tmp_path, capfd, budget, needle):
    code, _, err = call(
        export_main, ["--model", tiny_model_dir, "--budget", budget, "--out", tmp_path / "o"], capfd
    )
    assert_one_line_error(code, err, "baklava-export", needle)
    assert not (tmp_path / "o").exists()


def test_budget_below_floors(tiny_model_dir, tmp_path, capfd):
    code, _, err = call(
        export_main,
        [
            "--model",
            tiny_model_dir,
            "--budget",
            "2",
            "--out",
            tmp_path / "o",
            "--samples",
            "1",
            "--seq-len",
            "64",
            "--no-search",
        ],
        capfd,
    )
    assert_one_line_error(code, err, "baklava-export", "smaller than the floor")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path(tmp_path, capfd):
    code, _, err = call(
        export_main, ["--model", tmp_path / "nope", "--budget", "0.3", "--out", tmp_path / "o"], capfd
    )
    assert_one_line_error(code, err, "baklava-export", "model not found")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(tmp_path, capfd):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = call(export_main, ["--model", gpt2, "--budget", "0.3", "--out", tmp_path / "o"], capfd)
    assert_one_line_error(
        code, err, "baklava-export", "unsupported architecture 'gpt2'", "llama, mistral, qwen2"
    )
    assert not (tmp_path / "o").exists()


def _profile_for(tiny_model_dir, tmp_path, capfd):
    path = tmp_path / "p.json"
    code, _, err = call(profile_main, ["--model", tiny_model_dir, "--out", path, *FAST], capfd)
    assert code == 0, err
    return path


def test_corrupted_profile(tiny_model_dir, tmp_path, capfd):
    path = _profile_for(tiny_model_dir, tmp_path, capfd)
    path.write_text(path.read_text().replace('"sink": 4', '"sink": 5'))
    code, _, err = call(
        export_main,
        ["--model", tiny_model_dir, "--budget", "0.3", "--profile", path, "--out", tmp_path / "o"],
        capfd,
    )
    assert_one_line_error(code, err, "baklava-export", "checksum mismatch")
    assert not (tmp_path / "o").exists()


def test_profile_of_another_model(tiny_model_dir, tmp_path, capfd):
    from baklava.profiles.head_scores import HeadScores
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from tests.conftest import tiny_config

    path = BudgetProfile(
        ModelInfo.from_config(tiny_config(vocab_size=97), "other"), HeadScores.constant(2, 2)
    ).save(tmp_path / "other.json")
    code, _, err = call(
        export_main,
        ["--model", tiny_model_dir, "--budget", "0.3", "--profile", path, "--out", tmp_path / "o"],
        capfd,
    )
    assert_one_line_error(code, err, "baklava-export", "made for model 'other'")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_touched(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = call(export_main, ["--model", tiny_model_dir, "--budget", "0.3", "--out", out], capfd)
    assert_one_line_error(code, err, "baklava-export", "already exists")
    assert (out / "keep.txt").read_text() == "precious"


def test_run_rejects_tampered_artifact(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "art"
    code, _, err = call(
        export_main,
        ["--model", tiny_model_dir, "--budget", "0.5", "--out", out, *FAST, "--no-search", "--no-plot"],
        capfd,
    )
    assert code == 0, err
    profile = out / "profile.json"
    # without the search the deployed floor is still the search's default (half the uniform share)
    alloc = json.loads(profile.read_text())["allocation"]
    assert alloc["params"]["floor_frac"] == 0.5 and alloc["search"] is None
    caps = json.loads(profile.read_text())["capacities"]
    flat = [c for layer in caps for c in layer]
    assert min(flat) >= int(0.5 * sum(flat) / len(flat))
    profile.write_text(profile.read_text() + " ")
    code, _, err = call(run_main, [out, "--prompt", "the"], capfd)
    assert_one_line_error(code, err, "baklava-run", "sha256")
    code, _, err = call(run_main, [tmp_path, "--prompt", "the"], capfd)
    assert_one_line_error(code, err, "baklava-run", "not a BaKlaVa artifact")


def test_console_entry_point_exit_status(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from baklava.cli import export_main; export_main()",
            "--budget",
            "abc",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_output_directory_not_writable(tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = call(export_main, ["--budget", "0.3", "--out", blocker / "art"], capfd)
    assert_one_line_error(code, err, "baklava-export", "not a writable directory")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_run_on_cuda_without_a_gpu_is_one_line(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "art"
    argv = ["--model", tiny_model_dir, "--budget", "0.5", "--out", out, *FAST, "--no-search", "--no-plot"]
    code, _, err = call(export_main, argv, capfd)
    assert code == 0, err
    code, stdout, err = call(run_main, [out, "--prompt", "the", "--device", "cuda"], capfd)
    assert_one_line_error(code, err, "baklava-run", "no CUDA device")
    assert stdout == ""


def test_an_int8_export_runs_with_a_context_file(tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "int8"
    argv = ["--model", tiny_model_dir, "--budget", "8KiB", "--kv-dtype", "int8", "--out", out, *FAST]
    code, _, err = call(export_main, [*argv, "--no-search", "--no-plot", "--no-onnx"], capfd)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["budget"]["kv_dtype"] == "int8"
    # 8 KiB of int8 slots: 16 payload bytes + a 2-byte scale per key or value, 4 heads of 16 dims
    assert manifest["budget"]["total_tokens"] == 8192 // (2 * 18) == 227
    doc = tmp_path / "doc.txt"
    doc.write_text("the a of to and in is for that with " * 6)
    runs = {}
    for extra in ([], ["--context-file", doc]):
        argv = [out, "--prompt", "to and", "--prompt", "is", "--no-chat", "--json", "--max-new-tokens", "5"]
        code, stdout, err = call(run_main, [*argv, *extra], capfd)
        assert code == 0, err
        runs[bool(extra)] = [json.loads(line)["token_ids"] for line in stdout.splitlines()]
        assert [len(t) for t in runs[bool(extra)]] == [5, 5]
    assert runs[True] != runs[False]  # the document was read first
    code, _, err = call(
        run_main, [out, "--prompt", "x", "--context-file", doc, "--backend", "onnxruntime"], capfd
    )
    assert_one_line_error(code, err, "baklava-run", "--context-file runs on the torch backend")
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = call(run_main, [out, "--prompt", "x", "--context-file", tmp_path / "empty.txt"], capfd)
    assert_one_line_error(code, err, "baklava-run", "the context file is empty")
