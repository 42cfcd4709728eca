"""``baklava-bench``: benchmark commands (serve, decode, quality, speed, memory)."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import click

from baklava.atomic import write_text_atomic
from baklava.bench.serve_cli import RANDOM_HELP, RANDOM_LLAMA
from baklava.cli_options import (
    calibration_options,
    comma_list,
    model_option,
    parse_fractions,
    parse_kv_dtypes,
    parse_size_option,
)
from baklava.cli_runner import entry_point, log
from baklava.errors import BaklavaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench():
    """BaKlaVa benchmarks."""


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
            log(
                f"budget {row['budget']}: {base / row['decode_ms_per_token']:.2f}x the decode speed of {rows[0]['budget']}"
            )


_floats = comma_list(float, "numbers")


_ints = comma_list(int, "integers")


def _names(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _width_or_auto(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        width = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a width") from None
    if width < 1:
        raise click.BadParameter(f"{width} is not a width >= 1")
    return width


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
@click.option(
    "--agnostic-scoring",
    type=click.Choice(["reconstruct", "window"]),
    default="reconstruct",
    show_default=True,
    help="Query-agnostic setting: score the context by re-reading it, or by its last tokens (SnapKV).",
)
@click.option(
    "--reconstruct-pool",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _width_or_auto(value),
    help="Max-pool width of the reconstruction scores: an odd width, or 'auto' (none from budget 0.2 on, "
    "the eviction's pool kernel below).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(1),
    help="Prefill each method's cache in chunks of N tokens straight into its capacities, as the "
    "engine deploys it (SnapKV scores, each head its own tokens) [default: compress one full prefill].",
)
@click.option(
    "--kv-dtypes",
    default="auto",
    show_default=True,
    callback=parse_kv_dtypes,
    help="KV storage formats, comma-separated (auto = the model's dtype, fp8, int8, int4); the suite "
    "runs once per format, the first is the baseline the others are compared with.",
)
@click.option(
    "--smooth-keys/--no-smooth-keys",
    default=True,
    show_default=True,
    help="Quantized formats store each key minus its head's mean key (exact for attention; cuts the "
    "error a shared key offset costs); exported quantized graphs do the same.",
)
@click.option(
    "--balance-keys/--no-balance-keys",
    default=True,
    show_default=True,
    help="With --smooth-keys, also scale each key channel by sqrt(rms of the queries / rms of the "
    "keys) and the query by its inverse (exact for attention; cuts the logit error where queries "
    "weigh a channel heavily); exported quantized graphs always do.",
)
@click.option(
    "--baklava-selection",
    type=click.Choice(["auto", "shared", "own"]),
    default="auto",
    show_default=True,
    help="Tokens BaKlaVa's heads keep: one ranking from the favoured heads for all ('shared'), each "
    "head's own ('own'), or shared below budget 0.2 and own from it ('auto').",
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
    agnostic_scoring,
    reconstruct_pool,
    prefill_chunk,
    kv_dtypes,
    smooth_keys,
    balance_keys,
    baklava_selection,
    settings,
    scorer,
):
    """Long-context quality of every method and budget on a seeded RULER-like suite."""
    import dataclasses
    import sys

    import torch

    from baklava.bench.quality.benchmark import QualityConfig, run_quality
    from baklava.cli_runner import check_writable
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
        agnostic_scoring=agnostic_scoring,
        reconstruct_pool=reconstruct_pool,
        baklava_selection=baklava_selection,
        prefill_chunk=prefill_chunk,
        kv_dtypes=tuple(kv_dtypes),
        smooth_keys=smooth_keys,
        balance_keys=balance_keys,
        extra={"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
    )
    check_writable(Path(out) / "quality.json")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BaklavaError("--device cuda: no CUDA device here")
    lm = load_model(model_spec, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    lm.model.to(device)
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
    _log_targets(name, checks)
    log(f"wrote {Path(out) / 'quality.json'}, quality.md, quality.png ({doc['meta']['seconds']} s)")


@bench.command("quality-merge")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", type=click.Path(file_okay=False), required=True, help="Directory for the merged report."
)
@click.option(
    "--rows/--no-rows", default=True, show_default=True, help="Keep the per-prompt rows in the JSON."
)
def quality_merge(runs, out, rows):
    """One report from quality.json RUNS of the same setup on different lengths or tasks."""
    from baklava.bench.quality.benchmark import merge_quality

    _check_out(str(Path(out) / "quality.json"))
    doc = merge_quality(list(runs), out, with_rows=rows)
    name, checks = list(doc["targets"].items())[-1]
    _log_targets(name, checks)
    log(f"wrote {Path(out) / 'quality.json'}, quality.md, quality.png")


def _log_targets(name: str, checks: list[dict]) -> None:
    from baklava.bench.quality.report import describe

    for c in checks:
        log(f"{name}: {describe(c)}")


def _gpu_model(model_spec: str, device: str = "cuda"):
    """The model of ``--model`` in bf16 on the GPU, switched to the ``baklava`` attention.

    ``device="meta"``: the same model without weights (any machine), for counting bytes only."""
    import torch

    from baklava.bench.gpu_decode import RANDOM_MODELS, random_decoder
    from baklava.runtime.attention import enable

    if device == "cuda" and not torch.cuda.is_available():
        raise BaklavaError("this benchmark measures the GPU path: no CUDA device here")
    if model_spec in RANDOM_MODELS:
        model = random_decoder(RANDOM_MODELS[model_spec], device=device)
    else:
        from baklava.model_zoo import load_model

        model = load_model(model_spec, dtype=torch.bfloat16).model.to(device).eval()
    enable(model)
    return model


def _gpu_meta(device: str = "cuda") -> dict:
    import sys

    import torch

    return {
        "gpu": torch.cuda.get_device_name()
        if device == "cuda"
        else f"none ({device} device: tensor bytes only)",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


_gpu_model_option = click.option(
    "--model",
    "model_spec",
    default=RANDOM_LLAMA,
    show_default=True,
    help=RANDOM_HELP,
)


@bench.command("speed")
@_gpu_model_option
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--context", default=16384, show_default=True, type=click.IntRange(64))
@click.option("--budgets", default="1.0,0.3", show_default=True, callback=parse_fractions)
@click.option(
    "--transformers/--no-transformers", default=True, show_default=True, help="Also time plain transformers."
)
@click.option(
    "--kernel/--no-kernel",
    default=True,
    show_default=True,
    help="Also run the decode-attention kernel cases.",
)
@click.option(
    "--fused/--no-fused",
    default=True,
    show_default=True,
    help="Also time the step with the fused one-token layer forward.",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def speed_bench(model_spec, batch, context, budgets, transformers, kernel, fused, out):
    """GPU decode speed: the runtime's CUDA-graph step vs its bandwidth floor and plain transformers."""
    from baklava.bench import gpu_decode

    if out:
        _check_out(out)
    model = _gpu_model(model_spec)
    doc = {"meta": _gpu_meta() | {"model": model_spec}}
    if kernel:
        from baklava.bench import kernel_speed

        doc["kernel"] = []
        for case in kernel_speed.CASES:
            doc["kernel"].append(kernel_speed.measure(*case))
            click.echo(json.dumps(doc["kernel"][-1]))
    doc["end_to_end"] = gpu_decode.decode_speed(
        model,
        batch=batch,
        context=context,
        budgets=budgets,
        transformers=transformers,
        fused=fused,
        progress=lambda row: log(
            f"{row['budget']}{' fused' if row.get('fused') else ''}: {row['step_ms']:.2f} ms a step"
        ),
    )
    click.echo(json.dumps(doc["end_to_end"], indent=1))
    if out:
        write_text_atomic(out, json.dumps(doc, indent=1) + "\n")


@bench.command("memory")
@_gpu_model_option
@click.option("--context", default=32768, show_default=True, type=click.IntRange(64))
@click.option("--budgets", default="1.0,0.3,0.1", show_default=True, callback=parse_fractions)
@click.option(
    "--kv-memory",
    default="16GiB",
    show_default=True,
    callback=parse_size_option,
    help="Memory for the largest-batch search.",
)
@click.option(
    "--chunk", default=2048, show_default=True, type=click.IntRange(1), help="Chunked-prefill chunk."
)
@click.option(
    "--prefill/--no-prefill",
    default=True,
    show_default=True,
    help="Measure the peak of a CONTEXT-token prefill.",
)
@click.option(
    "--kv-dtypes",
    default="auto",
    show_default=True,
    callback=parse_kv_dtypes,
    help="KV storage formats for the bytes and the largest batch (auto = the model's dtype).",
)
@click.option(
    "--device",
    type=click.Choice(["cuda", "meta"]),
    default="cuda",
    show_default=True,
    help="cuda: allocate every cache on the GPU and read the allocator; meta: count the cache "
    "tensors' bytes without allocating them (any machine, no allocator overhead; needs --no-prefill).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def memory_bench(model_spec, context, budgets, kv_memory, chunk, prefill, kv_dtypes, device, out):
    """KV bytes allocated, largest batch in KV_MEMORY, and peak memory of a long prefill (GPU)."""
    from baklava.bench import memory
    from baklava.bench.gpu_decode import model_shape, uneven_capacities

    if device == "meta" and prefill:
        raise BaklavaError("--device meta counts bytes without running the model: add --no-prefill")
    if out:
        _check_out(out)
    model = _gpu_model(model_spec, device)
    layers, kv_heads, _, _ = model_shape(model)
    meta = _gpu_meta(device) | {"model": model_spec, "context": context, "device": device}
    doc = {"meta": meta, "budgets": [], "prefill": []}
    for budget in budgets:
        caps = uneven_capacities(layers, kv_heads, context, budget)
        first = None
        for kv_dtype in kv_dtypes:  # the same capacities stored in each format
            row = {"budget": budget, "kv_dtype": kv_dtype, "slots_per_sequence": int(caps.sum())}
            row |= memory.cache_bytes(model, caps, 1, kv_dtype)
            row["largest_batch"] = memory.largest_batch(model, caps, kv_memory, kv_dtype)
            first = row["largest_batch"]["batch"] if first is None else first  # the first format's
            row["batch_vs_first_kv_dtype"] = (
                round(row["largest_batch"]["batch"] / first, 3) if first else None
            )
            doc["budgets"].append(row)
            click.echo(json.dumps(row))
    if prefill:
        runs = [(None, None)]
        for budget in budgets:
            if budget < 1.0:
                caps = uneven_capacities(layers, kv_heads, context, budget)
                runs += [(caps, None), (caps, chunk)]
        for caps, ch in runs:
            row = memory.prefill_peak(model, context=context, capacities=caps, chunk=ch)
            row["cache"] = (
                "transformers"
                if caps is None
                else f"budget {int(caps.sum()) / (layers * kv_heads * context):.2f}"
            )
            doc["prefill"].append(row)
            click.echo(json.dumps(row))
    if out:
        write_text_atomic(out, json.dumps(doc, indent=1) + "\n")


def _check_out(out: str) -> None:
    from baklava.cli_runner import check_writable

    check_writable(Path(out))


bench_main = entry_point(bench, "baklava-bench")


from baklava.bench.serve_cli import (  # noqa: E402 - registered on the group above
    engine_bench,
    kv_dtype_bench,
    prefill_bench,
    serve_bench,
    soak_bench,
)

bench.add_command(serve_bench)
bench.add_command(engine_bench)
bench.add_command(soak_bench)
bench.add_command(prefill_bench)
bench.add_command(kv_dtype_bench)
