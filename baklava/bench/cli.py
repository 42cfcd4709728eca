"""``baklava-bench``: benchmark commands (``serve`` today)."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import click

from baklava.atomic import write_text_atomic
from baklava.cli import _log, _main
from baklava.errors import BaklavaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench():
    """BaKlaVa benchmarks."""


@bench.command("serve")
@click.argument("path", type=click.Path(file_okay=False), required=False)
@click.option("--url", help="Benchmark a running server (http://host:port) instead of starting one.")
@click.option("--requests", "n_requests", default=200, show_default=True, type=click.IntRange(1))
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--instances", default=2, show_default=True, type=click.IntRange(1), help="When starting a server."
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the full results as JSON.")
def serve_bench(path, url, n_requests, concurrency, max_tokens, instances, out):
    """Load run: REQUESTS streaming requests from CONCURRENCY clients against PATH (artifact or repo)."""
    import tempfile

    from baklava.bench.serve_load import load_run
    from baklava.serving.server import TritonServer
    from baklava.serving.triton_repo import is_artifact, is_repository, write_repository

    if (path is None) == (url is None):
        raise BaklavaError("give an artifact/repository PATH to serve, or --url of a running server")
    server = None
    if path is not None:
        if is_artifact(path):
            repo = write_repository(
                path, Path(tempfile.mkdtemp(prefix="baklava-bench-")) / "repo", instances=instances
            )
        elif is_repository(path):
            repo = Path(path)
        else:
            raise BaklavaError(f"{path}: neither an artifact nor a model repository")
        log = Path(tempfile.gettempdir()) / "baklava-bench-tritonserver.log"
        server = TritonServer(repo, 0, 0, 0, log_path=log).start()
        url = f"http://{server.http_url}"
        _log(f"tritonserver ready at {url} ({instances} instance(s); log {log})")
    try:
        summary = load_run(url, requests=n_requests, concurrency=concurrency, max_tokens=max_tokens)
    finally:
        if server is not None:
            server.stop()
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    summary["date"] = date.today().isoformat()
    if out:
        write_text_atomic(out, json.dumps(summary, indent=1) + "\n")
    row = {k: v for k, v in summary.items() if k != "results"}
    click.echo(json.dumps(row, indent=1))


@bench.command("decode")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=16, show_default=True, type=click.IntRange(1))
@click.option("--chunk", default=512, show_default=True, type=click.IntRange(1), help="Prefill chunk.")
def decode_bench(artifacts, context, steps, chunk):
    """Decode tokens/s of ARTIFACTS (ONNX Runtime, CPU) after a CONTEXT-token prompt, in one run."""
    from baklava.bench.decode import decode_speed

    rows = [decode_speed(a, context=context, steps=steps, chunk=chunk) for a in artifacts]
    for row in rows:
        click.echo(json.dumps(row))
    if len(rows) > 1:
        base = rows[0]["decode_ms_per_token"]
        for row in rows[1:]:
            _log(
                f"budget {row['budget']}: {base / row['decode_ms_per_token']:.2f}x the decode speed of {rows[0]['budget']}"
            )


bench_main = _main(bench, "baklava-bench")
