"""Where a served prefill chunk's time goes: host enqueue, GPU span, thread CPU, context switches.

Serves one workload (prompts 1k-16k tokens, random Qwen2.5-0.5B-shaped weights) with the batching
engine several times in one process, directly on the main thread or through the serving loop (its
engine thread), and records for every prompt's prefill call (one chunk a prompt here; hooks on
the model and on the engine's sampling, so the engine's own prefill is what runs):

    enqueue ms   host time to queue the model's forward (``model(...)`` returning)
    total ms     until its logits are on the host (the sync)
    GPU ms       CUDA events around the forward: the GPU's span, idle gaps included
    CPU ms       the calling thread's CPU time over the enqueue; switches: its voluntary ones

Enqueue ~= GPU span with total ~= enqueue means the GPU waited for the host. A run ``eager``
serves directly with transformers' own layer forward for the prefill chunks (the fused chunk
forward of ``runtime/fused_prefill.py`` off), to compare the two in one process. This found the
cuDNN plan per prompt length (BENCHMARKS.md, "cuDNN's plan per prompt length"). Optionally a
torch-profiler table of the first run's first chunks (``--profile-chunks``).

    python benchmarks/serve/prefill_probe.py --out probe          # GPU machine
    python benchmarks/serve/prefill_probe.py --out probe --smoke  # any machine: tiny model, CPU
    python benchmarks/serve/prefill_probe.py --out probe --plan "1.0:direct,eager,direct,eager"
"""

from __future__ import annotations

import json
import resource
import threading
import time
from pathlib import Path

import click
import numpy as np
import torch

from baklava.bench import serve_engine
from baklava.bench.gpu_decode import QWEN25_05B, random_decoder, uneven_capacities
from baklava.eviction import EvictionConfig
from baklava.runtime import engine as engine_module
from baklava.runtime import fused_decode
from baklava.runtime.engine import Engine

SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, vocab_size=1000)


class ChunkLog:
    """A record per prefill forward of the engine's own ``_prefill``: forward hooks on the model
    time the queueing (and CUDA events its GPU span), and the engine's ``next_token``, called once
    the step's prompts' logits are on the host (one sync a step), ends the step's records (one
    chunk a prompt here; ``total ms`` runs to that sync)."""

    def __init__(self, profile_chunks: int, out: Path):
        self.rows: list[dict] = []
        self.label = "-"
        self.profile_left, self.profiler, self.out = profile_chunks, None, out
        self.pending: list[dict] = []  # the forwards whose logits the host waits for

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)
        sample = engine_module.next_token

        def timed_next_token(*args, **kwargs):
            self._synced()
            return sample(*args, **kwargs)

        engine_module.next_token = timed_next_token

    def _before(self, model, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] == 1:  # decode steps (and their graph captures)
            return
        marks = None
        if ids.is_cuda:
            marks = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            marks[0].record()
        self.pending.append(
            {
                "tokens": ids.shape[1],
                "marks": marks,
                "rusage": resource.getrusage(resource.RUSAGE_THREAD),
                "cpu": time.thread_time(),
                "start": time.perf_counter(),
            }
        )

    def _after(self, model, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids")
        if not self.pending or ids is None or ids.shape[1] == 1 or "queued" in self.pending[-1]:
            return
        p = self.pending[-1]
        if p["marks"] is not None:
            p["marks"][1].record()
        p["queued"], p["cpu"] = time.perf_counter() - p["start"], time.thread_time() - p["cpu"]
        p["switches"] = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - p.pop("rusage").ru_nvcsw

    def _synced(self) -> None:
        done, self.pending = [p for p in self.pending if "queued" in p], []
        now = time.perf_counter()
        for p in done:  # none after the step's first sampling (and for a decode step's)
            marks = p["marks"]
            self.rows.append(
                {
                    "label": self.label,
                    "tokens": p["tokens"],
                    "enqueue_ms": 1000 * p["queued"],
                    "total_ms": 1000 * (now - p["start"]),
                    "gpu_ms": marks[0].elapsed_time(marks[1]) if marks else None,
                    "cpu_ms": 1000 * p["cpu"],
                    "switches": p["switches"],
                    "thread": threading.current_thread().name,
                }
            )
            self._profile_tick()

    def _profile_tick(self) -> None:
        if self.profiler is not None:
            self.profile_left -= 1
            if self.profile_left <= 0:
                self.profiler.__exit__(None, None, None)
                sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                table = self.profiler.key_averages().table(sort_by=sort, row_limit=40)
                (self.out / "profile.txt").write_text(table)
                self.profiler = None

    def start_profile(self) -> None:
        if self.profile_left > 0:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def summary(self, label: str) -> dict:
        mine = [r for r in self.rows if r["label"] == label]
        out = {"label": label, "prompts": len(mine)}
        for key in ("enqueue_ms", "total_ms", "gpu_ms", "cpu_ms", "switches"):
            values = [r[key] for r in mine if r[key] is not None]
            out[f"median_{key}"] = round(float(np.median(values)), 2) if values else None
        return out


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--requests", default=96, show_default=True)
@click.option("--kv-memory-gib", default=8.0, show_default=True)
@click.option(
    "--plan",
    default="1.0:direct,loop,direct;0.3:loop,direct",
    show_default=True,
    help="budget:run,run;budget:... (an engine per budget; direct = main thread, loop = serving loop, "
    "eager = direct with transformers' own layer forward for prefill chunks instead of the fused one)",
)
@click.option(
    "--profile-chunks", default=0, show_default=True, help="Profile the first run's first N chunks."
)
@click.option("--smoke", is_flag=True, help="A tiny model on the CPU with short prompts (checks the script).")
def main(out: Path, requests: int, kv_memory_gib: float, plan: str, profile_chunks: int, smoke: bool) -> None:
    parts = [part.split(":") for part in plan.split(";")]
    kinds = {kind for part in parts for kind in part[-1].split(",")}
    if any(len(part) != 2 for part in parts) or not kinds <= {"direct", "loop", "eager"}:
        raise click.BadParameter(
            f"{plan!r}: want budget:run,run;... with runs direct, loop or eager", param_hint="--plan"
        )
    out.mkdir(parents=True, exist_ok=True)
    shape = {**QWEN25_05B, **SMOKE} if smoke else QWEN25_05B
    device = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    model = random_decoder(shape, device=device)
    lengths, new, context = ((64, 400), (2, 4), 512) if smoke else ((1024, 16384), (128, 256), 16640)
    source = np.random.default_rng(0).integers(0, shape["vocab_size"], 1 << 20)
    work = serve_engine.workload(256, lengths, new, source, 0)[:requests]
    sizing = (
        dict(max_batch=4, prefill_chunk=512, max_prefill_tokens=512)
        if smoke
        else dict(kv_memory=int(kv_memory_gib * 2**30), prefill_chunk=16384, max_prefill_tokens=16384)
    )
    log = ChunkLog(profile_chunks, out)
    log.attach(model)
    warm_up = serve_engine._warm_up

    def labelled_warm_up(engine, w):  # the warm-up's chunks are not the run's
        label, log.label = log.label, "warm-up"
        try:
            warm_up(engine, w)
        finally:
            log.label = label

    serve_engine._warm_up = labelled_warm_up
    results, first = [], True
    for budget, runs in parts:
        caps = uneven_capacities(
            shape["num_hidden_layers"], shape["num_key_value_heads"], context, float(budget)
        )
        engine = Engine.from_capacities(model, None, caps, EvictionConfig(), chat=False, **sizing)
        for k, kind in enumerate(runs.split(",")):
            label = f"{budget} {kind} ({k + 1})"
            log.label = label
            if first:
                serve_engine._set_up(engine, work)
                log.start_profile()
                first = False
            if kind == "loop":
                row = serve_engine.run_engine_loop(engine, work, label, 0.0, progress=False)
            else:
                fused_decode.fuse(model, prefill=kind != "eager")
                try:
                    row = serve_engine.run_engine(engine, work, label, progress=False)
                finally:
                    fused_decode.fuse(model)
            summary = {**log.summary(label), "rows": row["rows"], "prefill_s": row["prefill_s"]}
            summary["tokens_per_s"] = row["tokens_per_s"]
            results.append(summary)
            print(json.dumps(summary), flush=True)
        del engine
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    (out / "chunks.json").write_text(json.dumps(log.rows))


if __name__ == "__main__":
    main()
