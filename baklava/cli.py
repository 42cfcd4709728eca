"""Command line: ``baklava-profile``, ``baklava-export``, ``baklava-run``.

Every user error ends as one line on stderr (``baklava-export: error: ...``) and exit status 2;
nothing is written unless the command succeeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from baklava.cli_options import (
    allocation_options,
    calibration_options,
    model_option,
    parse_budget,
)
from baklava.cli_runner import check_writable, entry_point, log
from baklava.errors import BaklavaError
from baklava.eviction import EvictionConfig


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


def _precheck(lm, budget, o) -> None:
    """Reject an impossible budget before profiling (which takes minutes on a CPU)."""
    from baklava.profiles.pipeline import resolve_budget
    from baklava.profiles.profile_file import ModelInfo

    resolve_budget(
        ModelInfo.from_config(lm.model.config, lm.name),
        budget,
        max_context=o["max_context"],
        min_cap=o["min_cap"],
        batch=o["batch"],
        dtype_bytes=_kv_element_bytes(lm, o),
    )


def _kv_element_bytes(lm, o) -> float:
    """Bytes a cache channel costs at ``--kv-dtype`` (a quantized format's scales included)."""
    from baklava.kv_format import element_bytes

    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return element_bytes(o["kv_dtype"], head_dim, lm.model.dtype.itemsize)


def _allocate(profile, budget, lm, settings, o) -> object:
    from baklava.profiles.allocators.baklava_allocator import DEFAULT_FLOOR_FRAC
    from baklava.profiles.pipeline import allocate

    params = None
    if o["method"] == "baklava" and (o["sharpness"] is not None or o["floor_frac"] is not None):
        params = {"sharpness": o["sharpness"] if o["sharpness"] is not None else 1.0}
        params["floor_frac"] = o["floor_frac"] if o["floor_frac"] is not None else DEFAULT_FLOOR_FRAC
    return allocate(
        profile,
        budget,
        lm=lm,
        method=o["method"],
        max_context=o["max_context"],
        min_cap=o["min_cap"],
        batch=o["batch"],
        dtype_bytes=_kv_element_bytes(lm, o),
        kv_dtype=o["kv_dtype"],
        eviction=EvictionConfig(sink=o["sink"], window=o["window"], policy=o["policy"]),
        search=o["search"],
        params=params,
        settings=settings,
    )


def _summary(profile) -> str:
    alloc = profile.allocation
    caps = profile.capacities
    search = alloc.get("search")
    line = (
        f"budget {alloc['budget']} -> {profile.total_tokens} token slots "
        f"({alloc['fraction']:.1%} of {caps.size} heads x {alloc['reference_context']}), "
        f"caps {caps.min()}..{caps.max()}, {alloc['method']} {alloc['params']}"
    )
    if search:
        best = min(c["ppl"] for c in search["candidates"])
        line += f"; search ppl {best} (uniform {search['uniform_ppl']}, full {search['full_ppl']})"
    return line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@calibration_options
@click.option("--budget", callback=parse_budget, help="Also allocate: 0.3, 512 (tokens/head) or 2GiB.")
@allocation_options
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Profile JSON to write.")
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write a PNG heatmap of scores (and capacities)."
)
def profile_cmd(model_spec, settings, scorer, budget, out, plot, **alloc_opts):
    """Profile a model once: per-KV-head importance (and capacities with --budget)."""
    from baklava.model_zoo import load_model
    from baklava.profiles.pipeline import score

    lm = load_model(model_spec)
    if budget is not None:
        _precheck(lm, budget, alloc_opts)
    profile = score(lm, settings, method=scorer)
    if budget is not None:
        profile = _allocate(profile, budget, lm, settings, alloc_opts)
        log(_summary(profile))
    profile.save(out)
    log(f"wrote {out}")
    if plot:
        from baklava.profiles.plot import plot_profile

        log(f"wrote {plot_profile(profile, plot)}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@click.option(
    "--budget", callback=parse_budget, required=True, help="0.3 (fraction), 512 (tokens/head) or 2GiB."
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Artifact directory to create.")
@click.option(
    "--profile", "profile_path", type=click.Path(dir_okay=False), help="Reuse this profile's scores."
)
@calibration_options
@allocation_options
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write DIR/profile.png.")
@click.option("--onnx/--no-onnx", "with_onnx", default=True, show_default=True, help="Write DIR/model.onnx.")
@click.option(
    "--engine",
    "with_engine",
    is_flag=True,
    help="Also build DIR/model.engine with TensorRT and the baklava plugins (needs TensorRT and a GPU).",
)
@click.option(
    "--engine-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True
)
@click.option(
    "--engine-max-batch", default=8, show_default=True, type=click.IntRange(1), help="Engine profile."
)
@click.option(
    "--engine-max-tokens",
    default=2048,
    show_default=True,
    type=click.IntRange(1),
    help="Longest prefill chunk the engine takes (longer prompts run in chunks).",
)
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
def export_cmd(
    model_spec,
    budget,
    out,
    profile_path,
    settings,
    scorer,
    plot,
    with_onnx,
    with_engine,
    engine_precision,
    engine_max_batch,
    engine_max_tokens,
    force,
    **alloc_opts,
):
    """Profile (or reuse --profile), allocate the budget, and write the artifact directory."""
    from baklava.exporter import write_artifact
    from baklava.model_zoo import load_model, resolve
    from baklava.profiles.pipeline import score
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo, config_fingerprint

    started = time.perf_counter()
    if Path(out).exists() and not force:
        raise BaklavaError(f"{out} already exists; choose another --out or pass --force")
    if with_engine and not with_onnx:
        raise BaklavaError("--engine is built from the ONNX graph: drop --no-onnx")
    check_writable(out)
    resolve(model_spec)  # fail fast on a missing model or an unsupported architecture
    reused = BudgetProfile.load(profile_path) if profile_path else None
    lm = load_model(model_spec)
    _precheck(lm, budget, alloc_opts)
    if reused is not None:
        reused.check_model(config_fingerprint(lm.model.config), source=profile_path)
        scored = BudgetProfile(model=ModelInfo.from_config(lm.model.config, lm.name), scores=reused.scores)
        log(f"reusing scores from {profile_path}")
    else:
        scored = score(lm, settings, method=scorer)
    profile = _allocate(scored, budget, lm, settings, alloc_opts)
    log(_summary(profile))
    extra = None
    if with_onnx:
        from baklava.exporter.onnx_export import onnx_available, onnx_writer

        if onnx_available():
            extra = onnx_writer(lm, profile)
        else:
            log("onnx/onnxruntime not installed: no ONNX graph (pip install 'baklava[onnx]')")
    artifact = write_artifact(out, profile, model_spec=model_spec, plot=plot, overwrite=force, extra=extra)
    kv = artifact.manifest["budget"]["kv_bytes_per_sequence"]
    log(f"wrote {out} (KV cache {_size(kv)} per sequence) in {time.perf_counter() - started:.0f} s")
    if with_engine:
        from baklava.trt_plugins.engine_build import EngineShapes, build_engine_after_export

        shapes = EngineShapes(max_batch=engine_max_batch, max_tokens=engine_max_tokens)
        entry = build_engine_after_export(artifact, engine_precision, shapes)
        log(
            f"wrote {out}/{entry['file']} (TensorRT {entry['tensorrt']}, {entry['gpu']}) in {entry['build_seconds']:.0f} s"
        )
    click.echo(str(Path(out) / "manifest.json"))


def _read_context(path: str) -> str:
    """The document of ``--context-file``, checked before any model loads."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise BaklavaError(f"{path}: the context file is empty")
    return text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (repeat for a batch).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 1 << 16))
@click.option(
    "--chat/--no-chat", default=True, show_default=True, help="Apply the tokenizer's chat template."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per prompt (token ids included)."
)
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
    default="torch",
    show_default=True,
    help="PyTorch runtime, the exported ONNX graph in ONNX Runtime, or DIR/model.engine in TensorRT.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="torch backend: cuda runs bf16 with the Triton kernels and CUDA-graph decode steps.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    help="torch backend: prompts served at once (the engine's pool rows) [default: all of them].",
)
@click.option(
    "--context-file",
    type=click.Path(exists=True, dir_okay=False),
    help="torch backend: a document read before every prompt, compressed as the quality benchmark "
    "measures a context read before its question (full prefill, reconstruction scores) instead of "
    "chunk by chunk.",
)
def run_cmd(artifact, prompts, max_new_tokens, chat, as_json, backend, device, max_batch, context_file):
    """Generate from an exported artifact with its budgeted per-head cache."""
    from baklava.exporter import read_artifact

    art = read_artifact(artifact)
    if context_file and backend != "torch":
        raise BaklavaError(
            "--context-file runs on the torch backend (the exported graphs have no scoring pass)"
        )
    context = _read_context(context_file) if context_file else None
    if backend in ("onnxruntime", "tensorrt"):
        from transformers import AutoTokenizer

        from baklava.backends.onnx_backend import generate_onnx, load_decoder

        chunk = None
        if backend == "tensorrt":
            from baklava.backends.tensorrt_backend import TensorRTDecoder

            decoder = TensorRTDecoder(art.path, art.manifest)
            chunk = decoder.max_tokens
        else:
            decoder = load_decoder(art.path, art.manifest)
        tokenizer = AutoTokenizer.from_pretrained(art.path / art.manifest["graphs"]["decoder"]["tokenizer"])
        started, stats = time.perf_counter(), {}
        results = generate_onnx(
            decoder,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            chat=chat,
            max_context=art.profile.model.max_context,
            stats=stats,
            chunk=chunk,
        )
        kv_bytes, kv_rows = stats["kv_bytes"], None
    else:
        import torch

        from baklava.model_zoo import load_model
        from baklava.runtime.engine import Engine
        from baklava.runtime.generate import Generation
        from baklava.runtime.sampling import SamplingParams

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BaklavaError("--device cuda: no CUDA device here")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        lm = load_model(art.model_spec, dtype=dtype, progress=not as_json)
        lm.model.to(device)
        # every prompt is a request of the batching engine, all served at once from one pool
        engine = Engine.from_profile(
            lm.model, lm.tokenizer, art.profile, max_batch=max_batch or len(prompts), chat=chat
        )
        started = time.perf_counter()
        params = SamplingParams(max_tokens=max_new_tokens)
        if context is not None:  # one chat message per prompt, cut after the document, as the benchmark cuts
            from baklava.runtime.chat_split import ChatSplit

            split = ChatSplit(lm.tokenizer, chat)
            questions = [split.question_ids(p) for p in prompts]
            tokens = engine.generate(questions, params, context=split.context_ids(context))
        else:
            tokens = engine.generate(list(prompts), params)
        results = [
            Generation(p, lm.tokenizer.decode(t, skip_special_tokens=True), t, len(engine.encode(p)))
            for p, t in zip(prompts, tokens, strict=True)
        ]
        kv_bytes, kv_rows = engine.pool.kv_bytes(), engine.pool.rows
    elapsed = time.perf_counter() - started
    for r in results:
        if as_json:
            click.echo(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids}))
        else:
            click.echo(r.text)
    tokens = sum(len(r.token_ids) for r in results)
    log(
        f"{tokens} tokens in {elapsed:.1f} s ({backend}{'' if backend != 'torch' else ', ' + device}); "
        f"KV cache {_size(kv_bytes)} "
        f"for {kv_rows or len(prompts)} sequence(s) ({art.profile.total_tokens} slots each)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option(
    "--backends",
    default="reference,onnxruntime,torch-cuda,tensorrt",
    show_default=True,
    help="Comma list; those that cannot run here are reported as skipped, with the reason.",
)
@click.option(
    "--context",
    default=512,
    show_default=True,
    type=click.IntRange(1),
    help="Prompt tokens (pydoc prose); above the capacities, so that heads evict.",
)
@click.option("--steps", default=8, show_default=True, type=click.IntRange(1), help="Decode steps.")
@click.option("--atol", default=1e-3, show_default=True, type=click.FloatRange(0))
@click.option(
    "--rtol", default=1e-4, show_default=True, type=click.FloatRange(0), help="Of max |reference logit|."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per backend.")
def check_cmd(artifact, backends, context, steps, atol, rtol, as_json):
    """Run ARTIFACT's backends on the same tokens and compare each with the PyTorch reference."""
    from baklava.check import check
    from baklava.exporter import read_artifact

    art = read_artifact(artifact)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    verdicts, _ = check(art, names, context=context, steps=steps, atol=atol, rtol=rtol)
    for v in verdicts:
        if as_json:
            click.echo(json.dumps(v.row()))
            continue
        detail = v.reason or (
            f"max |logit diff| {v.max_abs_diff:.2e} (tolerance {v.tolerance:.2e}), "
            f"greedy tokens agree {v.argmax_agree:.0%}, heads with the same kept tokens {v.heads_equal:.1%}"
        )
        click.echo(f"{v.backend:<12} {v.status:<8} {detail}")
    if any(v.status == "FAIL" for v in verdicts):
        raise SystemExit(1)


profile_main = entry_point(profile_cmd, "baklava-profile")
export_main = entry_point(export_cmd, "baklava-export")
run_main = entry_point(run_cmd, "baklava-run")
check_main = entry_point(check_cmd, "baklava-check")
