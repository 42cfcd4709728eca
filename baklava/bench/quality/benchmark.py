"""``run_quality``: profile once, build the suite, run every batch, write JSON + Markdown + PNG.

::

    model ─▶ head scores (profile, or --profile FILE) ─▶ BaKlaVa params per budget (perplexity search)
    seed ─▶ suite (tasks x lengths x samples) ─▶ batches ─▶ Runner (every method x budget) ─▶ rows
    rows ─▶ summary (averages, targets) ─▶ quality.json, quality.md, quality.png
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

from baklava import kv_format
from baklava.atomic import write_text_atomic
from baklava.bench.gpu_decode import model_shape
from baklava.bench.quality import kv_memory, report
from baklava.bench.quality.methods import METHODS, MethodContext
from baklava.bench.quality.runner import AGNOSTIC_SCORING, SETTINGS, Runner, combos
from baklava.bench.quality.tasks import TASKS, build_suite
from baklava.errors import BaklavaError
from baklava.runtime.packed_cache import BudgetedLayer
from baklava.runtime.shared_selection import SELECTIONS

DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass
class QualityConfig:
    """What to run; the defaults are the full suite for the default model."""

    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = SETTINGS
    samples: int = 8
    batch_size: int = 48
    batch_tokens: int = 393216  # longer prompts get smaller batches (the full prefill's mask grows as S^2)
    seed: int = 0
    search: bool = True  # BaKlaVa params by the perplexity search (what baklava-export does)
    # how a context compressed before its question is scored: "reconstruct" (the model re-reads it,
    # runtime/reconstruction.py) or "window" (SnapKV: the context's own last tokens)
    agnostic_scoring: str = "reconstruct"
    # max-pool width of the reconstruction scores: an odd width, None (the eviction's) or "auto"
    # (none from budget 0.2 on, the eviction's below: runtime/reconstruction.pool_width)
    reconstruct_pool: int | str | None = "auto"
    # tokens BaKlaVa's heads keep: "auto" (one shared ranking below budget 0.2, each head's own from
    # it), "shared" or "own" (runtime/shared_selection.py)
    baklava_selection: str = "auto"
    # None: every method's cache is the one full prefill compressed (the benchmark's path); N: each
    # method's cache is prefilled in N-token chunks straight into its capacities, as the engine and
    # baklava-run do (SnapKV scores accumulated per chunk, each head its own tokens)
    prefill_chunk: int | None = None
    # storage formats of the cache (baklava.kv_format), each run over the whole suite; the first
    # is the baseline the summary and targets read, the others are compared with it
    kv_dtypes: tuple[str, ...] = ("auto",)
    # quantized formats store keys minus their head's mean key (BudgetedLayer.smooth_keys)
    smooth_keys: bool = True
    # ... and balance them per channel against the queries (BudgetedLayer.balance_keys)
    balance_keys: bool = True
    chat: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the JSON (command line, profile source)

    def __post_init__(self) -> None:
        for name, known, given in (
            ("task", TASKS, self.tasks),
            ("method", METHODS, self.methods),
            ("setting", SETTINGS, self.settings),
        ):
            unknown = [g for g in given if g not in known]
            if unknown:
                raise BaklavaError(f"unknown {name} {unknown[0]!r}; known: {', '.join(known)}")
        if self.agnostic_scoring not in AGNOSTIC_SCORING:
            raise BaklavaError(
                f"unknown scoring {self.agnostic_scoring!r}; known: {', '.join(AGNOSTIC_SCORING)}"
            )
        if self.baklava_selection not in SELECTIONS:
            raise BaklavaError(
                f"unknown selection {self.baklava_selection!r}; known: {', '.join(SELECTIONS)}"
            )
        if self.reconstruct_pool not in (None, "auto") and (
            not isinstance(self.reconstruct_pool, int)
            or self.reconstruct_pool < 1
            or self.reconstruct_pool % 2 == 0
        ):
            raise BaklavaError(
                f"the reconstruction pool width must be a positive odd number or 'auto', got {self.reconstruct_pool}"
            )
        if not all(0 < b <= 1 for b in self.budgets):
            raise BaklavaError(f"budgets must be fractions in (0, 1], got {list(self.budgets)}")
        if self.samples < 1 or self.batch_size < 1:
            raise BaklavaError("samples and batch size must be >= 1")
        self.kv_dtypes = tuple(kv_format.parse(k).name for k in self.kv_dtypes)
        if not self.kv_dtypes or len(set(self.kv_dtypes)) != len(self.kv_dtypes):
            raise BaklavaError(f"KV dtypes must be distinct and at least one, got {list(self.kv_dtypes)}")


def _batches(samples, size):
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def run_quality(
    lm, profile, config: QualityConfig, out_dir: str | Path, *, settings=None, progress: bool = True
) -> dict:
    """Run the suite for ``lm`` with head scores from ``profile``; writes ``out_dir/quality.*``.

    Returns the JSON document (meta, rows, summary, targets).
    """
    from baklava.profiles.pipeline import CalibrationSettings, allocate

    max_context = lm.model.config.max_position_embeddings
    longest = max(config.lengths)
    if longest > max_context:
        raise BaklavaError(f"length {longest} is over {lm.name}'s context of {max_context}")
    started = time.perf_counter()
    settings = settings or CalibrationSettings()
    params: dict[float, dict] = {}
    objective = None  # what the search minimised, when one ran
    if "baklava" in config.methods:
        for b in sorted(config.budgets):
            if b < 1.0:
                alloc = allocate(
                    profile, b, lm=lm, search=config.search, settings=settings, progress=progress
                ).allocation
                params[b] = alloc["params"]
                objective = alloc["search"]["objective"] if alloc["search"] else objective
    suite = build_suite(
        lm.tokenizer,
        list(config.tasks),
        list(config.lengths),
        config.samples,
        seed=config.seed,
        chat=config.chat,
    )
    todo = combos(config.methods, config.budgets)
    # One batch mixes the generation tasks of a length: a step costs about the same for 8 rows or
    # 48, and every combo's cost is paid per batch.
    groups: dict[tuple, list] = {}
    for s in suite:
        groups.setdefault((s.length, s.task == "ppl"), []).append(s)
    work = []
    for (length, is_ppl), samples in groups.items():
        size = min(config.batch_size, max(1, config.batch_tokens // length))
        modes = ("-",) if is_ppl else config.settings
        work += [(batch, mode) for batch in _batches(samples, size) for mode in modes]
    bar = tqdm(
        total=len(work) * len(todo) * len(config.kv_dtypes), desc="quality", unit="run", disable=not progress
    )
    ctx = MethodContext(profile.scores, profile.eviction, params)
    pool = profile.eviction.pool_kernel if config.reconstruct_pool is None else config.reconstruct_pool
    runners = [
        Runner(
            lm.model,
            lm.tokenizer,
            ctx,
            on_step=bar.update,
            agnostic_scoring=config.agnostic_scoring,
            reconstruct_pool=pool,
            baklava_selection=config.baklava_selection,
            prefill_chunk=config.prefill_chunk,
            kv_dtype=kv,
        )
        for kv in config.kv_dtypes
    ]
    rows = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "quality.partial.jsonl"  # rows as they finish: a cut-off run keeps its results
    smoothing = BudgetedLayer.smooth_keys, BudgetedLayer.balance_keys
    # for every cache the runners build
    BudgetedLayer.smooth_keys, BudgetedLayer.balance_keys = config.smooth_keys, config.balance_keys
    try:
        with partial.open("w", encoding="utf-8") as log:
            for batch, setting in work:
                for runner in runners:
                    tasks = sorted({s.task for s in batch})  # a batch may pack several tasks
                    label = tasks[0] if len(tasks) == 1 else f"{tasks[0]} +{len(tasks) - 1} tasks"
                    bar.set_postfix_str(f"{label} {batch[0].length} {setting} {runner.kv_dtype}")
                    done = runner.run(batch, setting, todo)
                    log.writelines(json.dumps(r) + "\n" for r in done)
                    log.flush()
                    rows += done
    finally:
        BudgetedLayer.smooth_keys, BudgetedLayer.balance_keys = smoothing
    bar.close()
    device = next(lm.model.parameters()).device
    meta = {
        "model": lm.name,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": date.today().isoformat(),
        "seconds": round(time.perf_counter() - started, 1),
        "tasks": list(config.tasks),
        "lengths": list(config.lengths),
        "budgets": list(config.budgets),
        "methods": list(config.methods),
        "settings": list(config.settings),
        "samples": config.samples,
        "seed": config.seed,
        "eviction": profile.eviction.to_dict(),
        "agnostic_scoring": config.agnostic_scoring,
        "reconstruct_pool": pool,
        "baklava_selection": config.baklava_selection,
        "prefill_chunk": config.prefill_chunk,
        "kv_dtypes": list(config.kv_dtypes),
        "head_dim": model_shape(lm.model)[3],  # what a format's bytes a channel depend on
        "smooth_keys": config.smooth_keys,
        "balance_keys": config.balance_keys,
        "scorer": profile.scores.method,  # head scores BaKlaVa allocates by
        "search_objective": objective,
        "search_floors": list(settings.search_floors) if objective else None,
        "baklava_params": {str(k): v for k, v in params.items()},
        **config.extra,
    }
    doc = _write(out, meta, rows)
    partial.unlink()
    return doc


def _write(out: Path, meta: dict, rows: list[dict], *, with_rows: bool = True) -> dict:
    base = meta.get("kv_dtypes", ["auto"])[0]
    baseline = [r for r in rows if r.get("kv_dtype", "auto") == base]
    summary = report.summarize(baseline)
    summary["kv_dtypes"] = report.kv_dtype_table(rows, meta.get("kv_dtypes", ["auto"]))
    summary["kv_memory"] = kv_memory.points(summary["kv_dtypes"], meta.get("head_dim"))
    targets = report.targets(summary, baseline)
    doc = {"meta": meta, "summary": summary, "targets": targets, "rows": rows}
    kept = doc if with_rows else {k: v for k, v in doc.items() if k != "rows"}
    write_text_atomic(out / "quality.json", json.dumps(kept, indent=1, default=float) + "\n")
    write_text_atomic(out / "quality.md", report.markdown(summary, meta, targets))
    report.plot(summary, meta, out / "quality.png")
    return doc


# what must agree for runs to be one table: same prompts' recipe, cache and BaKlaVa allocation
_SAME = (
    "model",
    "dtype",
    "seed",
    "samples",
    "eviction",
    "agnostic_scoring",
    "reconstruct_pool",
    "baklava_selection",
    "prefill_chunk",
    "kv_dtypes",
    "scorer",
    "baklava_params",
    "methods",
    "budgets",
    "settings",
)


def _setup(meta: dict, key: str):
    if key == "baklava_selection" and key not in meta:  # runs before shared selection existed
        return "own"
    if key == "reconstruct_pool" and key not in meta:  # runs before the option pooled like SnapKV
        return meta.get("eviction", {}).get("pool_kernel")
    if key == "kv_dtypes" and key not in meta:  # runs before quantized storage: the model's dtype
        return ["auto"]
    return meta.get(key)


def merge_quality(paths, out_dir, *, with_rows: bool = True) -> dict:
    """One report from runs of the same setup on different lengths or tasks (``quality.json``
    files with their rows), e.g. a suite split to fit a time limit. Rewrites JSON, Markdown, PNG."""
    docs = []
    for p in paths:
        doc = json.loads(Path(p).read_text(encoding="utf-8"))
        if "rows" not in doc:
            raise BaklavaError(
                f"{p}: no per-prompt rows (written with rows left out?); merge the run's own quality.json"
            )
        docs.append(doc)
    first = docs[0]["meta"]
    for p, doc in zip(paths[1:], docs[1:], strict=True):
        diff = [k for k in _SAME if _setup(doc["meta"], k) != _setup(first, k)]
        if diff:
            raise BaklavaError(f"{p}: not the same setup as {paths[0]} ({', '.join(diff)} differ)")
    seen: set = set()
    for p, doc in zip(paths, docs, strict=True):
        cells = {(t, n) for t in doc["meta"]["tasks"] for n in doc["meta"]["lengths"]}
        if cells & seen:
            raise BaklavaError(
                f"{p}: overlaps an earlier run (task and length {sorted(cells & seen)[0]} twice)"
            )
        seen |= cells
    meta = dict(first)
    meta["lengths"] = sorted({n for d in docs for n in d["meta"]["lengths"]})
    meta["tasks"] = sorted({t for d in docs for t in d["meta"]["tasks"]})
    meta["seconds"] = round(sum(d["meta"]["seconds"] for d in docs), 1)
    meta["command"] = [d["meta"].get("command") for d in docs]
    meta["date"] = max(d["meta"]["date"] for d in docs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write(out, meta, [r for d in docs for r in d["rows"]], with_rows=with_rows)
