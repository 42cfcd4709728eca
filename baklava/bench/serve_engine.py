"""Served throughput at equal KV memory: the batching engine per budget against plain transformers.

One run, one GPU, one workload::

    N requests, all arriving at t = 0, prompts of [lo, hi] tokens, [a, b] new tokens each (no EOS)
        │
        ├─ transformers one at a time   model.generate (sdpa, DynamicCache), the first K requests
        ├─ transformers static batches  model.generate on batches as large as the KV memory holds
        │                               at the longest sequence (left-padded)
        └─ engine per budget            one pool of rows = kv_memory / sum(cap) bytes, CUDA graphs
                                        captured before the clock starts

For each: generated tokens/s, requests/s, time to first token (from t = 0, so queueing counts) and
inter-token latency percentiles, peak GPU memory (``max_memory_allocated``, weights included).
One-at-a-time serves only K requests (its rate is what counts); its TTFT is per request, from
the start of its own ``generate`` call.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from baklava.runtime.allocator_stats import allocator_counts, counts_since
from baklava.runtime.engine import Engine
from baklava.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Work:
    prompt: list[int]
    max_tokens: int


def workload(
    n: int, lengths: tuple[int, int], new_tokens: tuple[int, int], source: np.ndarray, seed: int = 0
) -> list[Work]:
    """``n`` requests: prompt lengths uniform in ``lengths``, new tokens uniform in ``new_tokens``,
    prompts cut from ``source`` (token ids, read cyclically from a random start)."""
    gen = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(gen.integers(lengths[0], lengths[1] + 1))
        start = int(gen.integers(0, len(source)))
        ids = np.take(source, np.arange(start, start + length), mode="wrap")
        out.append(Work(ids.tolist(), int(gen.integers(new_tokens[0], new_tokens[1] + 1))))
    return out


def prose_tokens(tokenizer) -> np.ndarray:
    """The standard library's documentation prose as token ids (the calibration text)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def summarize(
    name: str, wall: float, tokens: int, done: int, ttft: list[float], itl: list[float], **extra
) -> dict:
    """One row of the report (seconds, tokens/s, requests/s, percentiles in seconds)."""
    return {
        "system": name,
        "requests": done,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(done / wall, 3),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_ms": None if not itl else round(1000 * float(np.percentile(itl, 50)), 3),
        "itl_p99_ms": None if not itl else round(1000 * float(np.percentile(itl, 99)), 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        **extra,
    }


def _fresh_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()


class _Tally:
    """What a run's clients saw: tokens, each request's first and last token time, per-token gaps
    (an event of n tokens after a gap g counts n gaps of g / n)."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.itl: list[float] = []
        self.tokens = 0

    def add(self, event, now: float) -> None:
        n, rid = len(event.token_ids), event.request_id
        self.tokens += n
        if not n:
            return
        if rid in self.last:
            self.itl += [(now - self.last[rid]) / n] * n
        self.first.setdefault(rid, now)
        self.last[rid] = now


def _set_up(engine: Engine, work: list[Work]) -> float:
    """CUDA graphs and the warm-up before the clock starts; returns their seconds."""
    setup = time.perf_counter()
    engine.step_fn.capture_all()
    _warm_up(engine, work)
    setup_s = time.perf_counter() - setup
    _fresh_peak()
    return setup_s


def _engine_row(engine, name, start, ids, tally, rows_busy, setup_s, allocator, **extra) -> dict:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = time.perf_counter() - start
    ttft = [tally.first[i] - start for i in ids if i in tally.first]
    decode_tokens = tally.tokens - len(tally.first)  # a request's first token comes from its prefill
    return summarize(
        name,
        wall,
        tally.tokens,
        len(tally.first),
        ttft,
        tally.itl,
        rows=engine.pool.rows,
        kv_gib=round(engine.pool.kv_bytes() / 2**30, 3),
        slots_per_sequence=int(engine.pool.cache.capacities.sum()),
        mean_rows_busy=round(float(np.mean(rows_busy)), 1) if rows_busy else 0,
        setup_s=round(setup_s, 2),  # graph captures and the warm-up
        prefill_s=round(engine.phase_seconds["prefill"], 2),
        decode_s=round(engine.phase_seconds["decode"], 2),
        prefill_tokens=engine.prefill_tokens,
        # tokens sampled by decode steps per decode second
        decode_tokens_per_s=round(decode_tokens / max(engine.phase_seconds["decode"], 1e-9), 1),
        **_decode_steps(engine),
        cuda_allocator=counts_since(allocator, allocator_counts(engine.pool.device)),  # driver trips
        **extra,
    )


def _decode_steps(engine: Engine) -> dict:
    """The decode steps' account: how many, the rows each decoded and ran over on average (its
    bucket, free and prefilling rows included), the milliseconds one took, and the compactions
    that moved decoding rows down (and how many rows they moved)."""
    counts, steps = engine.decode_counts, max(engine.decode_counts["steps"], 1)
    return dict(
        decode_steps=counts["steps"],
        mean_rows_decoded=round(counts["rows_decoded"] / steps, 1),
        mean_rows_run=round(counts["rows_run"] / steps, 1),
        decode_step_ms=round(1e3 * engine.phase_seconds["decode"] / steps, 2),
        compactions=counts["compactions"],
        rows_moved=counts["rows_moved"],
    )


def run_engine(engine: Engine, work: list[Work], name: str, progress: bool = True, **extra) -> dict:
    """Serve ``work`` (all arriving at once) with ``engine`` stepped on this thread; the report row."""
    setup_s = _set_up(engine, work)
    bar = tqdm(total=len(work), desc=name, unit="req", disable=not progress)
    allocator = allocator_counts(engine.pool.device)
    start = time.perf_counter()
    ids = [engine.submit(w.prompt, SamplingParams(max_tokens=w.max_tokens, ignore_eos=True)) for w in work]
    tally, rows_busy = _Tally(), []
    while engine.has_work():
        rows_busy.append(engine.running)
        for event in engine.step():
            tally.add(event, event.time)
            if event.finished:
                bar.update()
    bar.close()
    return _engine_row(engine, name, start, ids, tally, rows_busy, setup_s, allocator, **extra)


def run_engine_loop(
    engine: Engine, work: list[Work], name: str, callback_us: float = 0.0, progress: bool = True, **extra
) -> dict:
    """:func:`run_engine` through the serving loop (:class:`~baklava.serving.engine_loop.EngineLoop`:
    the engine on its thread, callbacks on the delivery thread), as a served instance runs it minus
    Triton. Each callback holds the GIL ``callback_us`` microseconds (a busy wait: what one
    ``send`` of Triton's Python backend costs, ~85 us measured in its stub), so a run tells how much
    of a served engine's time its clients take; times are when a callback saw the event."""
    import threading

    from baklava.serving.engine_loop import EngineLoop

    setup_s = _set_up(engine, work)
    bar = tqdm(total=len(work), desc=name, unit="req", disable=not progress)
    tally, lock, done, left = _Tally(), threading.Lock(), threading.Event(), [len(work)]

    def on_event(event) -> None:
        now = time.perf_counter()
        while time.perf_counter() - now < callback_us * 1e-6:
            pass
        with lock:
            tally.add(event, now)
            if event.finished:
                bar.update()
                left[0] -= 1
                if not left[0]:
                    done.set()

    rows_busy, allocator = [], allocator_counts(engine.pool.device)
    start = time.perf_counter()
    with EngineLoop(engine) as loop:
        params = [SamplingParams(max_tokens=w.max_tokens, ignore_eos=True) for w in work]
        ids = [loop.submit(w.prompt, p, on_event) for w, p in zip(work, params, strict=True)]
        while not done.wait(0.01):
            rows_busy.append(engine.running)
    bar.close()
    return _engine_row(
        engine, name, start, ids, tally, rows_busy, setup_s, allocator, callback_us=callback_us, **extra
    )


def _engine_rows(engine, work, name, progress, loop_callback_us, repeats=1, **extra) -> list[dict]:
    """``engine`` stepped directly ``repeats`` times (rows ``run 1``, ``run 2``, ... when more than
    one), then through the serving loop once per callback cost."""
    rows = []
    for k in range(1, repeats + 1):
        label = name if repeats == 1 else f"{name}, run {k}"
        run = {"run": k} if repeats > 1 else {}
        rows.append(_logged(run_engine(engine, work, label, progress, **extra, **run)))
    for us in loop_callback_us:
        label = f"{name}, serving loop, callbacks {us:g} us"
        rows.append(_logged(run_engine_loop(engine, work, label, us, progress, **extra)))
    return rows


def _warm_up(engine: Engine, work: list[Work]) -> None:
    """Serve the workload's shortest and longest prompts (and both plus one token) for two tokens
    each before the clock starts, so the prefill kernels compile and the allocator grows outside
    the timed run (the CUDA-graph captures compile only the decode kernels). On the H200 the
    first engine's warm-up took 21.7 s, the next ones' 11.3 and 1.6 (run J, BENCHMARKS.md)."""
    lengths = [len(w.prompt) for w in work]
    engine.warm_up([min(lengths), max(lengths)])


class _Clock:
    """A transformers streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int, clock=None):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=0,
        streamer=clock,
    )


@torch.inference_mode()
def run_transformers_serial(model, work: list[Work], progress: bool = True) -> dict:
    """Plain ``model.generate`` (sdpa, DynamicCache) one request after another."""
    _fresh_peak()
    dev = next(model.parameters()).device
    ttft, itl, tokens = [], [], 0
    start = time.perf_counter()
    for w in tqdm(work, desc="transformers 1-at-a-time", unit="req", disable=not progress):
        clock = _Clock()
        ids = torch.tensor([w.prompt], device=dev)
        began = time.perf_counter()
        _hf_generate(model, ids, torch.ones_like(ids), w.max_tokens, clock)
        ttft.append(clock.times[0] - began)
        itl += np.diff(clock.times).tolist()
        tokens += len(clock.times)
    return summarize("transformers, one at a time", time.perf_counter() - start, tokens, len(work), ttft, itl)


@torch.inference_mode()
def run_transformers_static(model, work: list[Work], batch: int, progress: bool = True) -> dict:
    """Plain ``model.generate`` on consecutive static batches of ``batch`` (left-padded); a batch
    runs until its longest request is done, and only each request's own tokens count."""
    _fresh_peak()
    dev = next(model.parameters()).device
    ttft, itl, tokens = [], [], 0
    start = time.perf_counter()
    for i in tqdm(range(0, len(work), batch), desc=f"transformers static x{batch}", disable=not progress):
        group = work[i : i + batch]
        longest = max(len(w.prompt) for w in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, w in enumerate(group):
            ids[j, longest - len(w.prompt) :] = torch.tensor(w.prompt)
            mask[j, longest - len(w.prompt) :] = 1
        clock = _Clock()
        _hf_generate(model, ids.to(dev), mask.to(dev), max(w.max_tokens for w in group), clock)
        for w in group:
            mine = clock.times[: w.max_tokens]
            ttft.append(mine[0] - start)
            itl += np.diff(mine).tolist()
            tokens += len(mine)
    return summarize(
        f"transformers, static batches of {batch}", time.perf_counter() - start, tokens, len(work), ttft, itl
    )


def markdown(rows: list[dict], meta: dict) -> str:
    """The report as a Markdown table, ratios against one-at-a-time and against budget 1.0 served
    the same way (the same run of several, the same serving loop)."""

    def base_of(row: dict) -> dict | None:
        same = ("run", "callback_us")
        return next(
            (b for b in rows if b.get("budget") == 1.0 and all(b.get(k) == row.get(k) for k in same)), None
        )

    serial = next((r for r in rows if r["system"].endswith("one at a time")), None)
    lines = [
        f"{meta['model']}, {meta['requests']} requests (prompts {meta['prompt_lengths']} tokens, "
        f"{meta['new_tokens']} new), KV memory {meta['kv_memory_gib']} GiB, {meta['gpu']}, {meta['date']}",
        "",
        "| system | rows | tokens/s | vs 1.0 | vs 1-at-a-time | req/s | TTFT p50 / p99 s | ITL p50 / p99 ms "
        "| prefill / decode s | decode tokens/s | a decode step: rows decoded / run, ms | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = base_of(r) if "budget" in r else None
        vs_base = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        vs_serial = f"{r['tokens_per_s'] / serial['tokens_per_s']:.1f}x" if serial else ""
        phases = f"{r['prefill_s']} / {r['decode_s']}" if "prefill_s" in r else ""
        steps = (
            f"{r['mean_rows_decoded']} / {r['mean_rows_run']}, {r['decode_step_ms']}"
            if "decode_steps" in r
            else ""
        )
        lines.append(
            f"| {r['system']} | {r.get('rows', '')} | {r['tokens_per_s']} | {vs_base} | {vs_serial} | "
            f"{r['requests_per_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
            f"{r['itl_p50_ms']} / {r['itl_p99_ms']} | {phases} | {r.get('decode_tokens_per_s', '')} | "
            f"{steps} | {r['peak_gpu_gib']} |"
        )
    return "\n".join(lines) + "\n"


def _logged(row: dict) -> dict:
    """Print each row as it is measured (a run cut short keeps what it measured in its log)."""
    import json
    import sys

    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _capacities(model, lm, budget: float, context: int, scored):
    """``[L, H_kv]`` capacities at ``budget`` of ``context``: the profile's allocation for a real
    model (scored once, no search), a log-normal spread for random weights."""
    from baklava.bench.gpu_decode import model_shape, uneven_capacities

    if scored is None:
        layers, kv_heads, _, _ = model_shape(model)
        return uneven_capacities(layers, kv_heads, context, budget)
    from baklava.profiles.pipeline import allocate

    return allocate(scored, budget, lm=lm, max_context=context, search=False, progress=False).capacities


def compare(
    model_spec: str,
    *,
    budgets: list[float],
    kv_memory: int,
    kv_dtypes: list[str] = ("auto",),
    requests: int,
    lengths: tuple[int, int],
    new_tokens: tuple[int, int],
    prefill_chunk: int,
    max_prefill_tokens: int,
    hf_requests: int,
    hf_batch: int | None,
    hf_static_requests: int | None = None,
    seed: int = 0,
    prefill_kernel: bool = True,
    progress: bool = True,
    artifacts: list | None = None,
    loop_callback_us: list[float] = (),
    repeats: int = 1,
) -> tuple[list[dict], dict]:
    """Every system of the module docstring on one workload; returns ``(rows, meta)``. With
    ``artifacts`` (exported :class:`~baklava.exporter.artifact.Artifact` s of ``model_spec``) the
    engines are the served ones: each built from its artifact's profile (capacities, eviction, KV
    format) as a served instance builds it, one per artifact, instead of one per budget. Each engine
    also serves the workload through the serving loop once per ``loop_callback_us``
    (:func:`run_engine_loop`), after serving it directly ``repeats`` times (repeats show whether
    anything cached across runs, like cuDNN's per-length plans before the first chunk moved to
    flash attention, favours a later run: BENCHMARKS.md, "cuDNN's plan per prompt length")."""
    from baklava.bench.gpu_decode import RANDOM_MODELS, model_shape, random_decoder
    from baklava.eviction import EvictionConfig
    from baklava.model_zoo import load_model
    from baklava.profiles.pipeline import score
    from baklava.runtime.packed_cache import BudgetedLayer

    lm, scored = None, None
    if model_spec in RANDOM_MODELS:
        model, tokenizer = random_decoder(RANDOM_MODELS[model_spec]), None
        source = np.random.default_rng(seed).integers(0, RANDOM_MODELS[model_spec]["vocab_size"], 1 << 20)
    else:
        lm = load_model(model_spec, dtype=torch.bfloat16, progress=progress)
        lm.model.to("cuda").eval()
        model, tokenizer = lm.model, lm.tokenizer
        source = prose_tokens(tokenizer)
    context = lengths[1] + new_tokens[1]
    if context > model.config.max_position_embeddings:
        raise ValueError(f"prompts up to {lengths[1]} + {new_tokens[1]} new exceed the model's context")
    work = workload(requests, lengths, new_tokens, source, seed)
    hf_static_requests = hf_static_requests or requests
    layers, kv_heads, _, head_dim = model_shape(model)
    token_bytes = layers * kv_heads * head_dim * 2 * 2  # K and V, bf16
    rows = []
    batch = hf_batch if hf_batch is not None else max(1, kv_memory // (context * token_bytes))
    if lm is not None and not artifacts:
        with torch.inference_mode():
            scored = score(lm, progress=progress)
    sizing = dict(kv_memory=kv_memory, prefill_chunk=prefill_chunk, max_prefill_tokens=max_prefill_tokens)
    deployed, BudgetedLayer.prefill_kernel = BudgetedLayer.prefill_kernel, prefill_kernel  # restored below
    for artifact in artifacts or []:  # the served engines, token ids in (no chat template)
        budget = round(artifact.manifest["budget"]["fraction"], 3)  # 1.0 is the table's baseline
        engine = Engine.from_profile(model, tokenizer, artifact.profile, chat=False, **sizing)
        name = f"baklava engine, {artifact.path.name} (budget {budget})"
        kv_dtype = artifact.profile.kv_format
        rows += _engine_rows(
            engine, work, name, progress, loop_callback_us, repeats, budget=budget, kv_dtype=kv_dtype
        )
        del engine
    for budget in [] if artifacts else budgets:
        caps = _capacities(model, lm, budget, context, scored)
        for kv_dtype in kv_dtypes:  # the same capacities; a smaller format fits more rows
            engine = Engine.from_capacities(
                model, tokenizer, caps, EvictionConfig(), chat=False, kv_format=kv_dtype, **sizing
            )
            name = f"baklava engine, budget {budget}" + ("" if kv_dtype == "auto" else f", {kv_dtype}")
            rows += _engine_rows(
                engine, work, name, progress, loop_callback_us, repeats, budget=budget, kv_dtype=kv_dtype
            )
            del engine
    BudgetedLayer.prefill_kernel = deployed
    # plain transformers last, with transformers' own layer forward again (the fused one-token
    # forward off everywhere; its weights are views of the originals) and sdpa
    from baklava.runtime import fused_decode

    fused_decode.fuse(model, device_types=())
    model.set_attn_implementation("sdpa")
    if hf_requests:
        rows.append(_logged(run_transformers_serial(model, work[:hf_requests], progress)))
    if batch and hf_static_requests:
        rows.append(_logged(run_transformers_static(model, work[:hf_static_requests], batch, progress)))
    meta = {
        "model": model_spec,
        "requests": requests,
        "prompt_lengths": list(lengths),
        "new_tokens": list(new_tokens),
        "kv_memory_gib": round(kv_memory / 2**30, 2),
        "reference_context": context,
        "prefill_chunk": prefill_chunk,
        "max_prefill_tokens": max_prefill_tokens,
        "prefill_kernel": prefill_kernel,
        "transformers_one_at_a_time_requests": hf_requests,
        "transformers_static_batch": batch,
        "transformers_static_requests": min(hf_static_requests or requests, requests),
        "seed": seed,
        "artifacts": [str(a.path) for a in artifacts or []],
        "loop_callback_us": list(loop_callback_us),
        "repeats": repeats,
    }
    return rows, meta
