"""A real tritonserver (from the nvidia-pytriton wheel) serving the default model on loopback."""

from __future__ import annotations

import json
import os
import queue
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="serving extra not installed (pip install -e '.[serving]')")

from baklava.errors import BaklavaError  # noqa: E402
from baklava.serving.server import TritonServer  # noqa: E402
from baklava.serving.triton_repo import write_repository  # noqa: E402
from tests.conftest import export_smol  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.serving]

PROMPTS = [
    "What is the capital of France?",
    "Name a primary color.",
    "Say hello in Spanish.",
    "What is 2 + 2?",
    "Name a large animal.",
    "What do bees make?",
    "What is the opposite of hot?",
    "Name a fruit that is yellow.",
]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    # 32 slots a head on average (16 at least): the chat-templated prompts (~40 tokens) and their
    # answers do not fit, so served requests evict, in the engine's pool rows
    return export_smol(tmp_path_factory.mktemp("serving") / "artifact", "32")


@pytest.fixture(scope="module")
def repo(artifact):
    return write_repository(artifact, artifact.parent / "repo", instances=2, threads=1)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    with TritonServer(repo, 0, 0, 0, log_path=log) as srv:
        yield srv


def generate(server, body: dict, endpoint: str = "generate") -> tuple[int, dict | str]:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/baklava/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if endpoint == "generate" else text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def grpc_stream(server, inputs: dict) -> tuple[list[tuple[float, str]], str | None, tuple[float, float]]:
    """Send one streaming request over gRPC; returns ``([(arrival time, piece)], error, (sent, ended))``
    (``time.monotonic()`` when the request went out and when its final response came)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((time.monotonic(), result, error)))
    tensors = []
    for name, (arr, dtype) in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    sent = time.monotonic()
    client.async_stream_infer("baklava", tensors, enable_empty_final_response=True)
    pieces, error = [], None
    while True:
        when, result, err = events.get(timeout=300)
        if err is not None:
            error = str(err)
            break
        final = result.get_response().parameters.get("triton_final_response")
        out = result.as_numpy("text_output")
        if out is not None:
            pieces.append((when, out.reshape(-1)[0].decode()))
        if final is not None and final.bool_param:
            break
    client.stop_stream()
    client.close()
    return pieces, error, (sent, when)


def text_inputs(prompt: str, **extra) -> dict:
    inputs = {"text_input": (np.array([prompt.encode()], dtype=object), "BYTES")}
    inputs["max_tokens"] = (np.array([extra.pop("max_tokens", MAX_TOKENS)], dtype=np.int32), "INT32")
    for name, (value, dtype) in extra.items():
        inputs[name] = (
            np.array([value], dtype={"BOOL": bool, "FP32": np.float32, "INT32": np.int32}[dtype]),
            dtype,
        )
    return inputs


def test_http_generate_matches_the_runtime(server, smol, repo):
    from baklava.exporter import read_artifact
    from baklava.runtime import BudgetedCache
    from baklava.runtime.streaming import SamplingParams, stream_generate

    code, body = generate(server, {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert code == 200, body
    art = read_artifact(Path(repo) / "baklava" / "1" / "artifact")
    cache = BudgetedCache.from_profile(art.profile, model=smol.model)
    expected = "".join(
        stream_generate(smol.model, smol.tokenizer, cache, PROMPTS[0], SamplingParams(MAX_TOKENS))
    )
    assert body["text_output"] == expected
    seen = int(cache.layers[0].valid_seen[0])
    assert int(cache.fill_levels().min()) < seen  # the reference evicted: so did the server, alike


def test_a_context_is_compressed_before_the_prompt_as_the_engine_does(server, smol, repo):
    from baklava.exporter import read_artifact
    from baklava.runtime.chat_split import ChatSplit
    from baklava.runtime.engine import Engine
    from baklava.runtime.sampling import SamplingParams

    doc = "The secret word is pineapple. " + "Bees make honey in the summer. " * 8
    question = "What is the secret word?"
    code, body = generate(server, {"text_input": question, "context": doc, "max_tokens": MAX_TOKENS})
    assert code == 200, body
    art = read_artifact(Path(repo) / "baklava" / "1" / "artifact")
    engine = Engine.from_profile(smol.model, smol.tokenizer, art.profile, max_batch=1)
    split = ChatSplit(smol.tokenizer)
    engine.submit(split.question_ids(question), SamplingParams(MAX_TOKENS), context=split.context_ids(doc))
    assert body["text_output"] == "".join(event.text for event in engine.run())
    _, plain = generate(server, {"text_input": question, "max_tokens": MAX_TOKENS})
    assert plain["text_output"] != body["text_output"]  # the document was read
    code, bad = generate(server, {"text_input": question, "context": "  ", "max_tokens": MAX_TOKENS})
    assert code == 400 and "context is empty" in bad["error"]


def test_grpc_streaming_sends_tokens_one_by_one(server):
    pieces, error, (sent, ended) = grpc_stream(server, text_inputs(PROMPTS[2], stream=(True, "BOOL")))
    assert error is None
    assert len(pieces) >= 3  # one response per token, not one blob
    times = [t for t, _ in pieces]
    assert times == sorted(times)
    # the first piece is on its way while the rest is still being generated: it arrives within
    # the first half of the request's time (here ~1 of 10 decode steps after the prefill)
    assert times[0] - sent < 0.5 * (ended - sent), (times[0] - sent, ended - sent)
    _, whole = generate(server, {"text_input": PROMPTS[2], "max_tokens": MAX_TOKENS})
    assert "".join(p for _, p in pieces) == whole["text_output"]


def test_http_generate_stream_events(server):
    code, text = generate(
        server,
        {"text_input": PROMPTS[3], "max_tokens": MAX_TOKENS, "stream": True},
        endpoint="generate_stream",
    )
    assert code == 200
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert len(events) >= 2
    _, whole = generate(server, {"text_input": PROMPTS[3], "max_tokens": MAX_TOKENS})
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    # each piece says how many tokens it holds (pieces a client has not taken yet merge)
    assert all(e["num_tokens"] >= 1 for e in events)
    assert sum(e["num_tokens"] for e in events) == whole["num_tokens"] <= MAX_TOKENS


def test_concurrent_clients_get_what_they_get_alone(server):
    alone = [generate(server, {"text_input": p, "max_tokens": MAX_TOKENS})[1]["text_output"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(
            pool.map(lambda p: generate(server, {"text_input": p, "max_tokens": MAX_TOKENS}), PROMPTS)
        )
    assert [code for code, _ in together] == [200] * len(PROMPTS)
    assert [body["text_output"] for _, body in together] == alone
    assert len(set(alone)) == len(alone)  # different prompts, different answers: no shared cache


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_tokens": 4}, "text_input"),
        ({"text_input": "", "max_tokens": 4}, "empty"),
        ({"text_input": "   ", "max_tokens": 4}, "empty"),
        ({"text_input": "hi", "max_tokens": -1}, "max_tokens"),
        ({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text_input": "hi", "max_tokens": 10**6}, "max_tokens"),
        ({"text_input": "word " * 9000, "max_tokens": 4}, "context"),
        ({"text_input": "hi", "max_tokens": "many"}, "Unable to parse"),  # refused by the server's JSON layer
        ({"text_input": "hi", "max_tokens": 4, "temperature": -1.0}, "temperature"),
    ],
)
def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, body, needle):
    code, reply = generate(server, body)
    assert code >= 400 and "error" in reply
    assert needle in reply["error"]
    assert server.is_ready()
    code, ok = generate(server, {"text_input": PROMPTS[1], "max_tokens": 3})
    assert code == 200 and ok["text_output"]


def test_a_short_soak_of_mixed_requests_fails_nothing_and_leaks_no_row(server):
    from baklava.bench.soak import soak

    # the repository's instances serve 8 rows each (the CPU default): 8 concurrent requests after
    # the soak succeed only if abandoned and refused requests gave their rows back
    result = soak(f"http://{server.http_url}", duration_s=12, clients=4, max_tokens=4, rows=8, seed=1)
    assert result["failures"] == 0, result["failure_reasons"]
    assert set(result["requests"]) == {"valid", "malformed", "abandoned"}
    assert result["after_soak_rows_ok"] == 8
    assert server.is_ready()


def test_the_soak_command_serves_an_artifact_and_writes_its_summary(artifact, tmp_path, monkeypatch):
    import tempfile

    import torch

    from baklava.bench.cli import bench_main
    from baklava.exporter import read_artifact
    from baklava.runtime.slot_pool import bytes_per_sequence

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its scratch repository goes
    out = tmp_path / "soak.json"
    profile = read_artifact(artifact).profile  # a pool of 2 rows (float32 on the CPU) by its memory
    per = bytes_per_sequence(profile.require_capacities(), profile.model.head_dim, torch.float32)
    args = [
        "soak",
        str(artifact),
        "--duration",
        "4",
        "--clients",
        "2",
        "--max-tokens",
        "3",
        "--kv-memory",
        f"{2 * per + per // 2}B",
    ]
    try:
        bench_main([*args, "--out", str(out)])
    except SystemExit as e:  # exit 0 is returned, not raised; 1 means a failed request or a lost row
        pytest.fail(f"baklava-bench soak exited with {e.code}")
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0 and summary["ready_after"] and summary["after_soak_rows_ok"] == 2
    assert summary["after_soak_rows"] == 2  # the rows the instance reported, not a default of 8
    assert sum(summary["requests"].values()) > 0 and summary["device"] == "cpu"
    assert not list(tmp_path.glob("baklava-soak-*/"))  # its repository (a copy of the artifact) is gone


def test_the_serve_command_loads_artifacts_served_with_the_engine_options(
    artifact, tmp_path, monkeypatch, capsys
):
    """Two PATHs (the same artifact twice: one model's budgets in practice): one server after
    the other, the same requests, a table against the first."""
    import tempfile

    from baklava.bench.cli import bench_main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "serve.json"
    args = [
        "serve",
        str(artifact),
        str(artifact),
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--max-tokens",
        "3",
    ]
    try:  # prompts of 40-60 tokens from the docs (the artifact's tokenizer cuts them)
        bench_main(
            [*args, "--instances", "1", "--max-batch", "2", "--prompt-lengths", "40,60", "--out", str(out)]
        )
    except SystemExit as e:
        pytest.fail(f"baklava-bench serve exited with {e.code}")
    runs = json.loads(out.read_text())
    assert [r["path"] for r in runs] == [str(artifact)] * 2
    for summary in runs:
        assert summary["failures"] == 0 and summary["device"] == "cpu"
        assert [r["tokens"] for r in summary["results"]] == [3] * 4
        assert 0 < summary["itl_p50_ms"] <= summary["itl_p99_ms"]  # 2 gaps a request
        assert summary["peak_gpu_memory_gib"] is None  # a CPU server reports no GPU memory
        assert summary["rows"] == 2  # one instance of --max-batch 2, as its ready line says
        spent = summary["engine_seconds"]  # the served engine's reports, read from the server's log
        assert spent["taken"] == spent["finished"] == 4 + 1  # and the start's probe request
        assert spent["steps"] >= 3 and spent["prefill_s"] + spent["decode_s"] <= spent["step_s"] + 0.2
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {artifact} |")]
    assert len(table) == 2 and "| 1.00x |" in table[0]
    assert not list(tmp_path.glob("baklava-bench-*/"))  # their repositories are gone


def test_gpu_memory_in_use_is_read_from_tritons_metrics():
    from baklava.bench.serve_load import gpu_memory_used

    metrics = """# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 1.25e+10
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 3000
nv_gpu_memory_total_bytes{gpu_uuid="GPU-a"} 1.5e+11
nv_inference_count{model="baklava",version="1"} 12
"""
    assert gpu_memory_used(metrics) == 12_500_003_000  # both GPUs, not the total
    assert gpu_memory_used('nv_inference_count{model="baklava"} 12\n') is None


def test_long_prompts_have_the_lengths_asked_for(smol):
    """The serve benchmark's long prompts: text that tokenizes back to the drawn lengths."""
    from baklava.bench.serve_load import long_prompts

    texts = long_prompts(smol.tokenizer, 6, (300, 900), seed=2)
    lengths = [len(smol.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert all(290 <= n <= 910 for n in lengths), lengths
    assert max(lengths) - min(lengths) > 100 and len(set(texts)) == 6
    assert texts == long_prompts(smol.tokenizer, 6, (300, 900), seed=2)  # seeded


def test_a_repository_refuses_engine_options_it_already_fixes(repo, capsys):
    from baklava.bench.cli import bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["serve", str(repo), "--device", "cuda", "--requests", "1"])
    assert e.value.code != 0 and "its config.pbtxt sets device" in capsys.readouterr().err


def test_wrong_dtype_over_grpc(server):
    inputs = text_inputs(PROMPTS[0])
    inputs["max_tokens"] = (np.array([4.0], dtype=np.float32), "FP32")
    pieces, error, _ = grpc_stream(server, inputs)
    assert error is not None and "max_tokens" in error and not pieces
    assert server.is_ready()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_repository_records_the_engine_pool_and_refuses_bad_settings(repo, tmp_path):
    from baklava.errors import BaklavaError
    from baklava.serving.triton_repo import pool_size

    art = repo.parent / "artifact"
    out = write_repository(art, tmp_path / "gpu", device="cuda:1", kv_memory="40GiB", prefill_chunk=512)
    config = (out / "baklava" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config
    for key, value in (
        ("device", "cuda:1"),
        ("kv_memory", "40GiB"),
        ("max_batch", ""),
        ("prefill_chunk", "512"),
    ):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config
    assert pool_size({"kv_memory": "40GiB", "max_batch": ""}, "cuda:1") == (40 * 2**30, None)
    assert pool_size({"kv_memory": "", "max_batch": "3"}, "cpu") == (None, 3)
    assert pool_size({}, "cpu") == (None, 8)
    for kwargs, needle in (
        ({"kv_memory": "lots"}, "lots"),
        ({"kv_memory": "3"}, "not a memory size"),
        ({"device": "gpu"}, "device must be cpu, cuda or cuda:N"),
        ({"max_batch": 0}, "max_batch must be >= 1"),
    ):
        with pytest.raises(BaklavaError, match=needle):
            write_repository(art, tmp_path / "bad", **kwargs)
        assert not (tmp_path / "bad").exists()  # refused before anything is written


BROKEN_MODEL = """
import sys


class TritonPythonModel:
    def execute(self, requests):
        # what the GPU machine's stub logged before dying (numpy 2 under a stub built for numpy 1)
        print("  triton_python_backend_utils.py(117): deserialize_bytes_tensor", file=sys.stderr, flush=True)
        raise RuntimeError("broken on purpose")
"""


def test_a_ready_server_whose_model_fails_every_request_is_refused(artifact, tmp_path):
    """start() probes the model with one request: a model that loads but cannot answer (the GPU
    machine's numpy 2 stub did this) stops the server with the cause, not a ready server."""
    broken = write_repository(artifact, tmp_path / "repo")
    (broken / "baklava" / "1" / "model.py").write_text(BROKEN_MODEL)
    srv = TritonServer(broken, 0, 0, 0, log_path=tmp_path / "log")
    with pytest.raises(
        BaklavaError, match="ready but its model failed a first request .*broken on purpose"
    ) as e:
        srv.start(timeout=120)
    assert "run it with numpy<2" in str(e.value)  # the log named the stub's string decoding
    assert srv.process is None and not srv.is_ready()
    # the same log file, another failure: only this run's lines count (no stale numpy hint)
    quiet = "class TritonPythonModel:\n    def execute(self, requests):\n        raise RuntimeError('broken on purpose')\n"
    (broken / "baklava" / "1" / "model.py").write_text(quiet)
    with pytest.raises(BaklavaError, match="broken on purpose") as e:
        TritonServer(broken, 0, 0, 0, log_path=tmp_path / "log").start(timeout=120)
    assert "numpy" not in str(e.value)


def test_baklava_serve_serves_an_artifact_until_sigterm_and_leaves_nothing(artifact, tmp_path):
    """The command as a user runs it: ready line and example request on stdout, a request
    answered, SIGTERM -> exit 0 with the server, its stubs and the artifact's repository gone."""
    import signal
    import subprocess
    import sys
    import threading

    env = os.environ | {"TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    command = "from baklava.serving.cli import serve_main; serve_main()"
    ports = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", command, str(artifact), *ports, "--max-batch", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        curl = proc.stdout.readline()  # the example request, printed once the server is ready
        assert curl.startswith("curl -s http://127.0.0.1:"), curl + proc.stderr.read()
        url = curl.split()[2]  # http://127.0.0.1:PORT/v2/models/baklava/generate
        port = url.split(":")[2].split("/")[0]
        body = json.dumps({"text_input": PROMPTS[3], "max_tokens": 3}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and json.loads(response.read())["text_output"].strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "shutting down" in proc.stderr.read()
    assert _processes_mentioning(f"--http-port={port}") == []
    assert not list(tmp_path.glob("baklava-repo-*"))  # the artifact's repository


def test_baklava_serve_refuses_a_path_that_is_nothing_to_serve(tmp_path):
    import subprocess
    import sys

    command = "from baklava.serving.cli import serve_main; serve_main()"
    proc = subprocess.run(
        [sys.executable, "-c", command, str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "neither an artifact" in proc.stderr, proc.stderr


def test_server_shuts_down_without_leftovers(repo, tmp_path):
    srv = TritonServer(repo, 0, 0, 0, log_path=tmp_path / "log").start()
    pid, pgid = srv.process.pid, os.getpgid(srv.process.pid)
    assert _processes_mentioning(f"--http-port={srv.http_port}") == [pid]
    srv.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the server and its backend stubs are gone
    assert _processes_mentioning(f"--http-port={srv.http_port}") == []
    assert not srv.is_ready()


def test_backend_directory_relinks_a_dangling_or_foreign_link(tmp_path, monkeypatch):
    """A backend directory cached by another install (moved virtualenv) is repaired, not trusted."""
    import sys

    from baklava.serving.server import _pytriton_root, backend_directory

    monkeypatch.setenv("BAKLAVA_CACHE", str(tmp_path))
    python_dir = (
        tmp_path / "triton" / f"backends-py{sys.version_info.major}.{sys.version_info.minor}" / "python"
    )
    python_dir.mkdir(parents=True)
    (python_dir / "libtriton_python.so").symlink_to("/nonexistent/old-venv/libtriton_python.so")
    (python_dir / "triton_python_backend_utils.py").symlink_to(tmp_path)  # exists, but not pytriton's
    target = backend_directory()
    source = _pytriton_root() / "tritonserver" / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        assert (target / "python" / name).resolve() == (source / name).resolve()


def test_the_stub_finds_the_wheels_libraries_wherever_pytriton_is_installed(tmp_path, monkeypatch):
    """The copied stub loses its ``$ORIGIN`` rpath: the vendored CUDA runtime must come from
    beside the located ``pytriton`` package (on the GPU machine it sat in a ``--target`` dir on
    PYTHONPATH, not in site-packages, and the stub failed to load ``libcudart-*.so``)."""
    import shutil
    import subprocess

    from baklava.serving import server as srv

    root = tmp_path / "elsewhere" / "pytriton"
    monkeypatch.setattr(srv, "_pytriton_root", lambda: root)
    assert str(root.parent / "nvidia_pytriton.libs") in srv.server_env()["LD_LIBRARY_PATH"].split(os.pathsep)
    monkeypatch.undo()

    stub = srv.backend_directory() / "python" / "triton_python_backend_stub"
    vendored = set(os.listdir(srv._pytriton_root().parent / "nvidia_pytriton.libs"))
    if shutil.which("ldd") is None:
        pytest.skip("no ldd here")
    out = subprocess.run(["ldd", str(stub)], env=srv.server_env(), capture_output=True, text=True).stdout
    needed = {line.split()[0] for line in out.splitlines() if "=>" in line}
    assert any(name.startswith("libcudart") for name in needed & vendored)
    missing = {line.split()[0] for line in out.splitlines() if "not found" in line}
    assert not missing & vendored, missing
