"""``baklava-bench``: benchmark commands (serve, decode, quality)."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import click

from baklava.atomic import write_text_atomic
from baklava.cli import _log, _main, calibration_options, model_option
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


def _comma_list(kind, noun: str):
    """A click callback parsing ``"a,b,c"`` into a tuple of ``kind`` (None when not given)."""

    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",")) if value else None
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {noun}, got {value!r}") from None

    return parse


_floats = _comma_list(float, "numbers")
_ints = _comma_list(int, "integers")


def _names(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@bench.command("quality")
@model_option
@click.option(
    "--out", type=click.Path(file_okay=False), required=True, help="Directory for quality.{json,md,png}."
)
@click.option(
    "--profile", "profile_path", type=click.Path(dir_okay=False), help="Reuse this profile's head scores."
)
@click.option("--tasks", callback=_names, help="Comma list (default: all). niah_single, ..., vt, fwe, ppl.")
@click.option("--lengths", callback=_ints, help="Context lengths in tokens [default: 2048,4096,8192].")
@click.option("--budgets", callback=_floats, help="Fractions [default: 0.05,0.1,0.2,0.3,0.5,1.0].")
@click.option("--methods", callback=_names, help="Comma list (default: all seven).")
@click.option("--settings", "modes", callback=_names, help="query-aware, query-agnostic (default: both).")
@click.option(
    "--limit", default=8, show_default=True, type=click.IntRange(1), help="Samples per task and length."
)
@click.option(
    "--batch-size", default=48, show_default=True, type=click.IntRange(1), help="Prompts per batch."
)
@click.option(
    "--batch-tokens", default=393216, show_default=True, type=click.IntRange(1), help="Cap on batch x length."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--search/--no-search", default=True, show_default=True, help="BaKlaVa params by perplexity search."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--sink", type=click.IntRange(0), help="Eviction: sink tokens every head keeps [profile's].")
@click.option(
    "--window", type=click.IntRange(0), help="Eviction: recent tokens every head keeps [profile's]."
)
@click.option(
    "--obs-window", type=click.IntRange(1), help="Eviction: queries that score the prefill [profile's]."
)
@click.option(
    "--pool-kernel", type=click.IntRange(1), help="Eviction: max-pool width of the scores [profile's]."
)
@calibration_options
def quality_bench(
    model_spec,
    out,
    profile_path,
    tasks,
    lengths,
    budgets,
    methods,
    modes,
    limit,
    batch_size,
    batch_tokens,
    seed,
    search,
    device,
    sink,
    window,
    obs_window,
    pool_kernel,
    calibration,
    samples,
    seq_len,
    scorer,
    search_context,
):
    """Long-context quality of every method and budget on a seeded RULER-like suite."""
    import dataclasses
    import sys

    import torch

    from baklava.bench.quality.benchmark import QualityConfig, run_quality
    from baklava.cli import _check_calibration, _check_writable, _settings
    from baklava.model_zoo import load_model
    from baklava.profiles.pipeline import score
    from baklava.profiles.profile_file import BudgetProfile, config_fingerprint

    fields = {"tasks": tasks, "lengths": lengths, "budgets": budgets, "methods": methods, "settings": modes}
    config = QualityConfig(
        **{k: v for k, v in fields.items() if v is not None},
        samples=limit,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        seed=seed,
        search=search,
        extra={"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
    )
    _check_writable(Path(out) / "quality.json")
    _check_calibration(calibration)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BaklavaError("--device cuda: no CUDA device here")
    lm = load_model(model_spec, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    lm.model.to(device)
    settings = _settings(calibration, samples, seq_len, search_context)
    if profile_path:
        profile = BudgetProfile.load(profile_path, expect_fingerprint=config_fingerprint(lm.model.config))
    else:
        with torch.inference_mode():
            profile = score(lm, settings, method=scorer)
        profile.save(Path(out) / "profile.json")
    overrides = {"sink": sink, "window": window, "obs_window": obs_window, "pool_kernel": pool_kernel}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        try:
            profile.eviction = dataclasses.replace(profile.eviction, **overrides)
        except ValueError as e:
            raise BaklavaError(str(e)) from None
    doc = run_quality(lm, profile, config, out, settings=settings)
    name, checks = list(doc["targets"].items())[-1]  # "all" when both settings ran
    for c in checks:
        _log(
            f"{name}: {c['target']} = {'n/a' if c['value'] is None else c['value']} (goal {c['goal']}) {'met' if c['met'] else 'MISSED'}"
        )
    _log(f"wrote {Path(out) / 'quality.json'}, quality.md, quality.png ({doc['meta']['seconds']} s)")
