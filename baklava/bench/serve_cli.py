"""Serving benchmarks: ``baklava-bench serve`` (a load run through a real tritonserver, one or
several artifacts: :mod:`baklava.bench.serve_load`), ``baklava-bench engine`` (served throughput
per budget at equal KV memory, the batching engine in process against plain transformers, one
GPU, one run: :mod:`baklava.bench.serve_engine`) and ``baklava-bench soak`` (a real tritonserver
under valid, malformed and abandoned requests for a set time: :mod:`baklava.bench.soak`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from baklava.cli_options import (
    engine_options,
    parse_fractions,
    parse_kv_dtypes,
    parse_pair,
    parse_size_option,
)
from baklava.cli_runner import log
from baklava.errors import BaklavaError

RANDOM_LLAMA = "random-llama-3-8b"  # the GPU benchmarks' default model (gpu_decode.RANDOM_MODELS)
RANDOM_HELP = "random-llama-3-8b / random-qwen2.5-0.5b (those shapes, random bf16 weights), or an alias / directory / .gguf."
_model_option = click.option(
    "--model",
    "model_spec",
    default=RANDOM_LLAMA,
    show_default=True,
    help=RANDOM_HELP,
)


@click.command("engine")
@_model_option
@click.option(
    "--budgets", default="1.0,0.3,0.1", show_default=True, callback=parse_fractions, help="Fractions."
)
@click.option(
    "--kv-memory",
    default="40GiB",
    show_default=True,
    callback=parse_size_option,
    help="KV memory every system gets.",
)
@click.option(
    "--kv-dtypes",
    default="auto",
    show_default=True,
    callback=parse_kv_dtypes,
    help="KV storage formats, comma-separated (auto = the model's dtype; fp8, int8, int4): an engine "
    "per budget and format, each sized by its real bytes in the same KV memory.",
)
@click.option("--requests", "n_requests", default=256, show_default=True, type=click.IntRange(1))
@click.option(
    "--prompt-lengths", default="1024,16384", show_default=True, callback=parse_pair, help="LO,HI tokens."
)
@click.option("--new-tokens", default="128,256", show_default=True, callback=parse_pair, help="LO,HI tokens.")
@click.option("--prefill-chunk", default=8192, show_default=True, type=click.IntRange(1))
@click.option("--max-prefill-tokens", default=16384, show_default=True, type=click.IntRange(1))
@click.option(
    "--hf-requests",
    default=8,
    show_default=True,
    type=click.IntRange(0),
    help="Requests plain transformers serves one at a time (0: skip).",
)
@click.option(
    "--hf-batch",
    type=click.IntRange(0),
    help="Static batch of plain transformers [default: what the KV memory holds at the longest "
    "sequence; 0: skip].",
)
@click.option(
    "--hf-static-requests",
    type=click.IntRange(1),
    help="Requests plain transformers serves in static batches [default: all].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--prefill-kernel/--no-prefill-kernel",
    default=True,
    show_default=True,
    help="Later prefill chunks through the Triton prefill-attention kernels (else SDPA).",
)
@click.option(
    "--artifacts",
    "artifact_paths",
    help="Comma list of exported artifacts of one model: an engine each, built from its profile as "
    "baklava-serve builds it (instead of --budgets; --model: theirs).",
)
@click.option(
    "--loop-callback-us",
    default="",
    callback=lambda ctx, param, value: _parse_us(value),
    help="Comma list of microseconds: each engine also serves the workload through the serving loop "
    "(its engine and delivery threads, as a served instance) once per value, every callback holding "
    "the GIL that long (Triton's send: ~85) [default: not through the loop].",
)
@click.option(
    "--repeats",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Times each engine serves the workload directly, a row each ('run k'; ratios against budget "
    "1.0's same run): shows whether a later run is favoured by what an earlier one cached.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Write serve.json and serve.md here.")
def engine_bench(
    model_spec, budgets, kv_memory, kv_dtypes, n_requests, prompt_lengths, new_tokens, prefill_chunk,
    max_prefill_tokens, hf_requests, hf_batch, hf_static_requests, seed, prefill_kernel, artifact_paths,
    loop_callback_us, repeats, out,
):  # fmt: skip
    """Served tokens/s, TTFT and inter-token latency per budget at equal KV memory (GPU)."""
    import torch

    from baklava.bench.cli import _gpu_meta
    from baklava.bench.serve_engine import compare, markdown

    artifacts = _read_artifacts(artifact_paths) if artifact_paths else None
    if artifacts:
        model_spec = artifacts[0].model_spec
    if not torch.cuda.is_available():
        raise BaklavaError("this benchmark measures the GPU path: no CUDA device here")
    rows, meta = compare(
        model_spec,
        artifacts=artifacts,
        loop_callback_us=loop_callback_us,
        repeats=repeats,
        budgets=list(budgets),
        kv_dtypes=list(kv_dtypes),
        kv_memory=kv_memory,
        requests=n_requests,
        lengths=prompt_lengths,
        new_tokens=new_tokens,
        prefill_chunk=prefill_chunk,
        max_prefill_tokens=max_prefill_tokens,
        hf_requests=hf_requests,
        hf_batch=hf_batch,
        hf_static_requests=hf_static_requests,
        seed=seed,
        prefill_kernel=prefill_kernel,
    )
    meta |= _gpu_meta()
    table = markdown(rows, meta)
    click.echo(table)
    if out:
        _write_report(out, "serve", meta, rows, table)


def _parse_us(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated microseconds, got {value!r}") from None
    if any(v < 0 for v in out):
        raise click.BadParameter("microseconds must be >= 0")
    return out


def _read_artifacts(paths: str) -> list:
    """The artifacts of a comma list, all of one model (else a one-line error)."""
    from baklava.exporter.artifact import read_artifact

    artifacts = [read_artifact(p.strip()) for p in paths.split(",") if p.strip()]
    models = {a.model_spec for a in artifacts}
    if len(models) > 1:
        raise BaklavaError(f"--artifacts must be of one model, got {', '.join(sorted(models))}")
    return artifacts


@click.command("serve")
@click.argument("paths", nargs=-1, type=click.Path(file_okay=False))
@click.option("--url", help="Benchmark a running server (http://host:port) instead of starting one.")
@click.option("--requests", "n_requests", default=200, show_default=True, type=click.IntRange(1))
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--instances", default=2, show_default=True, type=click.IntRange(1), help="When starting a server."
)
@click.option(
    "--prompt-lengths",
    callback=parse_pair,
    help="LO,HI: long prompts of LO-HI tokens cut from the standard library's docs (needs a "
    "PATH, for its model's tokenizer) [default: short built-in questions].",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Of the long prompts.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the full results as JSON.")
@engine_options
def serve_bench(
    paths, url, n_requests, concurrency, max_tokens, instances, prompt_lengths, seed, out, **engine
):
    """Load run: REQUESTS streaming requests from CONCURRENCY clients against each PATH (artifact
    or model repository; one server at a time, the same requests), or against --url.

    An artifact gets a temporary repository with --device, --kv-memory, --max-batch and
    --prefill-chunk; a repository keeps its own. Several PATHs (one model's budgets, say) end
    with a table of each one's tokens/s against the first's."""
    import os
    import platform
    from datetime import date

    from baklava.atomic import write_text_atomic
    from baklava.bench.serve_load import long_prompts, serve_markdown

    if bool(paths) == bool(url):
        raise BaklavaError("give artifact/repository PATHs to serve, or --url of a running server")
    texts = None
    if prompt_lengths is not None:
        from baklava.exporter import read_artifact
        from baklava.model_zoo import load_tokenizer
        from baklava.serving.triton_repo import artifact_in

        if not paths:
            raise BaklavaError("--prompt-lengths needs a PATH (its model's tokenizer)")
        tokenizer = load_tokenizer(read_artifact(artifact_in(paths[0])).model_spec)
        texts = long_prompts(tokenizer, n_requests, prompt_lengths, seed)
    load = dict(requests=n_requests, concurrency=concurrency, max_tokens=max_tokens, texts=texts)
    runs = [_serve_one(p, instances, load, engine) for p in paths] if paths else [_load_url(url, load)]
    for summary in runs:
        summary["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
        summary["date"] = date.today().isoformat()
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    if len(runs) > 1:
        click.echo(serve_markdown(runs))
    if out:
        write_text_atomic(out, json.dumps(runs[0] if len(runs) == 1 else runs, indent=1) + "\n")


def _load_url(url: str, load: dict) -> dict:
    from baklava.bench.serve_load import load_run

    return load_run(url, **load) | {"path": None, "device": "(running server)"}


def _serve_one(path: str, instances: int, load: dict, engine: dict) -> dict:
    """Start a tritonserver for ``path`` (its repository in a temporary directory), load it, stop."""
    import tempfile

    from baklava.bench.serve_load import load_run
    from baklava.serving.engine_loop import engine_seconds, served_rows
    from baklava.serving.server import TritonServer
    from baklava.serving.triton_repo import repository_to_serve

    with tempfile.TemporaryDirectory(prefix="baklava-bench-") as scratch:  # an artifact's repository
        repo = repository_to_serve(path, scratch, instances=instances, **engine)
        server_log = Path(tempfile.gettempdir()) / "baklava-bench-tritonserver.log"
        with TritonServer(repo, 0, 0, 0, log_path=server_log) as server:
            url = f"http://{server.http_url}"
            rows = served_rows(server.log_text() or "")
            log(
                f"tritonserver ready at {url} for {path} ({instances} instance(s) on {engine['device']}, "
                f"{rows or '?'} rows; log {server_log})"
            )
            metrics = f"http://{server.host}:{server.metrics_port}/metrics"
            summary = load_run(url, metrics_url=metrics, **load)
        # stopped: its engine's reports of where the time went are all in the log now
        spent = engine_seconds(server.log_text() or "")
    return summary | {"path": str(path), "device": engine["device"], "rows": rows, "engine_seconds": spent}


@click.command("soak")
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--duration", default=600, show_default=True, type=click.IntRange(1), help="Seconds.")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option("--malformed", default=0.2, show_default=True, type=click.FloatRange(0, 1), help="Share.")
@click.option("--abandoned", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="Share.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the summary as JSON.")
@engine_options
def soak_bench(artifact, duration, clients, max_tokens, malformed, abandoned, seed, out, **engine):
    """Serve ARTIFACT with a real tritonserver and soak it; exit 1 on any failed request."""
    import os
    import platform
    import tempfile
    from datetime import date

    from baklava.atomic import write_text_atomic
    from baklava.bench.soak import soak
    from baklava.exporter import read_artifact
    from baklava.model_zoo import load_config
    from baklava.serving.engine_loop import served_rows
    from baklava.serving.server import TritonServer
    from baklava.serving.triton_repo import write_repository

    if malformed + abandoned > 1:
        raise BaklavaError("--malformed + --abandoned must be at most 1")
    art = read_artifact(artifact)
    server_log = Path(tempfile.gettempdir()) / "baklava-soak-tritonserver.log"
    with (
        tempfile.TemporaryDirectory(prefix="baklava-soak-") as scratch,
        TritonServer(
            write_repository(artifact, Path(scratch) / "repo", **engine), 0, 0, 0, log_path=server_log
        ).start() as server,
    ):
        rows = served_rows(server.log_text() or "")  # what the instances report they hold
        if rows is None:
            raise BaklavaError(f"the served instances did not report their pools (log: {server_log})")
        log(
            f"tritonserver ready at http://{server.http_url} ({rows} rows; log {server_log}); soaking {duration} s"
        )
        summary = soak(
            f"http://{server.http_url}",
            duration_s=duration,
            clients=clients,
            max_tokens=max_tokens,
            malformed_share=malformed,
            abandoned_share=abandoned,
            rows=rows,
            context_tokens=load_config(art.model_spec).max_position_embeddings,  # the engine's context
            seed=seed,
        )
        summary["ready_after"] = server.is_ready()
    summary |= {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": date.today().isoformat(),
        "device": engine["device"],
    }
    click.echo(json.dumps(summary, indent=1))
    if out:
        write_text_atomic(out, json.dumps(summary, indent=1) + "\n")
    if summary["failures"] or not summary["ready_after"] or summary["after_soak_rows_ok"] < rows:
        raise SystemExit(1)


def _chunks(ctx, param, value):
    try:
        return [None if c.strip() in ("0", "none") else int(c) for c in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected sizes like 'none,512,2048', got {value!r}") from None


@click.command("prefill")
@_model_option
@click.option("--contexts", default="8192,32768", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--budgets", default="1.0,0.3,0.1", show_default=True, callback=parse_fractions)
@click.option("--chunks", default="none,2048", show_default=True, callback=_chunks, help="'none' = one pass.")
@click.option(
    "--sdpa/--no-sdpa",
    default=True,
    show_default=True,
    help="Also time chunked prefill with one SDPA call per KV head for later chunks (what the "
    "Triton prefill kernels replaced).",
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(file_okay=False), help="Write prefill.json and prefill.md here.")
def prefill_bench(model_spec, contexts, budgets, chunks, sdpa, repeats, out):
    """Time to first token of the budgeted prefill against transformers sdpa (GPU)."""
    from baklava.bench.cli import _gpu_meta, _gpu_model
    from baklava.bench.prefill_speed import markdown, prefill_speed

    try:
        lengths = [int(c) for c in contexts.split(",")]
    except ValueError:
        raise BaklavaError(f"--contexts: expected integers like 8192,32768, got {contexts!r}") from None
    model = _gpu_model(model_spec)
    if max(lengths) > model.config.max_position_embeddings:
        raise BaklavaError(f"--contexts exceed the model's {model.config.max_position_embeddings} positions")
    rows = prefill_speed(
        model, contexts=lengths, budgets=list(budgets), chunks=chunks, sdpa=sdpa, repeats=repeats,
        progress=lambda row: click.echo(json.dumps(row), err=True),
    )  # fmt: skip
    meta = _gpu_meta() | {"model": model_spec, "repeats": repeats}
    table = markdown(rows, meta)
    click.echo(table)
    if out:
        _write_report(out, "prefill", meta, rows, table)


@click.command("kv-dtype")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--context", default=32768, show_default=True, type=click.IntRange(64))
@click.option("--budget", default=0.3, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--launches",
    default="64x4x2,mma8",
    show_default=True,
    help="Split-kernel launches BLOCKxWARPSxSTAGES (the Triton kernel: slots a tile step, warps, "
    "pipeline stages) or mmaN[sK][xS][mM][c] (the Gluon mma kernel of int8 / fp8 slots: N one-warp programs "
    "an SM, K 16-slot steps a chunk of its ring, S chunks, M the fewest chunks a program); several: every format timed at each it runs, "
    "against bf16 at the first (a launch sweep). The default times what the runtime deploys: the "
    "Triton kernel's launch, and the mma kernel's for int8 / fp8.",
)
@click.option(
    "--calls",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Calls one CUDA graph replays (a step's layers share its launch); the time is one call's.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Write kv_dtype.json and kv_dtype.md here.")
def kv_dtype_bench(batch, context, budget, rounds, launches, calls, out):
    """Decode attention over bf16 / fp8 / int8 / int4 slots, one layer of Llama-3-8B shapes (GPU)."""
    import torch

    from baklava.bench.cli import _gpu_meta
    from baklava.bench.kv_dtype_speed import markdown, measure, parse_launches

    launches = parse_launches(launches)  # a bad spelling fails before the GPU check
    if not torch.cuda.is_available():
        raise BaklavaError("this benchmark measures the GPU kernels: no CUDA device here")
    rows = measure(batch, context, budget, rounds, launches=launches, calls=calls)
    meta = _gpu_meta() | {"calls_per_graph": calls}
    table = markdown(rows, meta)
    click.echo(table)
    if out:
        _write_report(out, "kv_dtype", meta, rows, table)


def _write_report(out: str, stem: str, meta: dict, rows: list[dict], table: str) -> None:
    """``out/stem.json`` (meta and rows) and ``out/stem.md`` (the table), each written atomically."""
    from baklava.atomic import write_text_atomic

    Path(out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out) / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_text_atomic(Path(out) / f"{stem}.md", table)
    log(f"wrote {out}/{stem}.json and {stem}.md")
