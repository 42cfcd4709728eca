"""Option groups the commands share: model, calibration (profile + search), allocation.

``calibration_options`` hands the command two values instead of its seven options: ``settings``
(a :class:`~baklava.profiles.pipeline.CalibrationSettings`, its file checked) and ``scorer``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from baklava.errors import BaklavaError
from baklava.eviction import POLICIES
from baklava.kv_format import NAMES as KV_NAMES
from baklava.profiles.allocation_search import DEFAULT_FLOORS, OBJECTIVES
from baklava.profiles.allocators import ALLOCATORS
from baklava.profiles.budget import Budget, BudgetError, parse_size
from baklava.profiles.scorers import DEFAULT_SCORER, SCORERS


def parse_budget(ctx, param, value):
    if value is None:
        return None
    return Budget.parse(value)  # BaklavaError -> one line via _main


def model_option(f):
    return click.option(
        "--model",
        "model_spec",
        default="smollm2-135m",
        show_default=True,
        help="Alias (smollm2-135m, qwen2.5-coder-0.5b), local HF directory, .gguf file, or hub id.",
    )(f)


def comma_list(kind, noun: str):
    """A click callback parsing ``"a,b,c"`` into a tuple of ``kind`` (None when not given)."""

    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",")) if value else None
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {noun}, got {value!r}") from None

    return parse


def parse_fractions(ctx, param, value):
    """Comma list of budget fractions, each in (0, 1] (None when not given)."""
    budgets = comma_list(float, "numbers")(ctx, param, value)
    if budgets and any(not 0 < b <= 1 for b in budgets):
        raise click.BadParameter(f"fractions in (0, 1], got {value}")
    return budgets


def parse_kv_dtypes(ctx, param, value):
    """Comma list of KV storage formats (:mod:`baklava.kv_format`), checked, by canonical name."""
    from baklava.kv_format import parse

    try:
        return tuple(parse(v.strip()).name for v in value.split(",") if v.strip()) if value else None
    except BaklavaError as e:
        raise click.BadParameter(str(e)) from None


def parse_size_option(ctx, param, value):
    """A memory size like ``16GiB`` in bytes (None when not given)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except BudgetError as e:
        raise click.BadParameter(str(e)) from None


def parse_floors(ctx, param, value) -> tuple[float, ...]:
    """``--search-floors``: a comma list of fractions in [0, 1]."""
    floors = comma_list(float, "numbers")(ctx, param, value)
    if not floors or not all(0 <= f <= 1 for f in floors):
        raise click.BadParameter(f"{value!r}: every floor is a fraction of the uniform share in [0, 1]")
    return floors


def check_calibration(path) -> None:
    if path is not None and not Path(path).is_file():
        raise BaklavaError(f"calibration file not found: {path}")


def calibration_options(f):
    """The calibration and search options; the command receives ``settings`` and ``scorer``."""

    @functools.wraps(f)
    def command(
        *args,
        calibration,
        samples,
        seq_len,
        scorer,
        search_context,
        search_objective,
        search_floors,
        **kwargs,
    ):
        from baklava.profiles.pipeline import CalibrationSettings

        check_calibration(calibration)
        settings = CalibrationSettings(
            path=calibration,
            samples=samples,
            seq_len=seq_len,
            search_context=search_context,
            search_objective=search_objective,
            search_floors=search_floors,
        )
        return f(*args, settings=settings, scorer=scorer, **kwargs)

    options = [
        click.option(
            "--calibration",
            type=click.Path(dir_okay=False),
            help="Text or .jsonl file (default: pydoc prose).",
        ),
        click.option(
            "--samples", default=4, show_default=True, type=click.IntRange(1), help="Calibration windows."
        ),
        click.option(
            "--seq-len", default=1024, show_default=True, type=click.IntRange(64), help="Tokens per window."
        ),
        click.option(
            "--scorer",
            type=click.Choice(sorted(SCORERS)),
            default=DEFAULT_SCORER,
            show_default=True,
            help="Head importance: retrieval (copy-source attention), cosine or entropy.",
        ),
        click.option(
            "--search-context",
            default=1024,
            show_default=True,
            type=click.IntRange(32),
            help="Context length of the allocation search.",
        ),
        click.option(
            "--search-objective",
            type=click.Choice(OBJECTIVES),
            default="reconstruction",
            show_default=True,
            help="What the allocation search minimises: perplexity of the context repeated from the "
            "compressed cache, or of the text that follows it.",
        ),
        click.option(
            "--search-floors",
            default=",".join(f"{f:g}" for f in DEFAULT_FLOORS),
            show_default=True,
            callback=parse_floors,
            help="Head floors the search tries, as fractions of the uniform share (comma list); "
            "the older default was 0.1,0.3.",
        ),
    ]
    return _stack(command, options)


def _stack(f, options):
    """``f`` decorated with ``options`` in the order listed (the first shows first in --help)."""
    for opt in reversed(options):
        f = opt(f)
    return f


def allocation_options(f):
    return _stack(
        f,
        [
            click.option(
                "--method", type=click.Choice(sorted(ALLOCATORS)), default="baklava", show_default=True
            ),
            click.option(
                "--max-context", type=click.IntRange(1), help="Reference context (default: the model's)."
            ),
            click.option(
                "--min-cap",
                default=16,
                show_default=True,
                type=click.IntRange(1),
                help="Smallest head capacity.",
            ),
            click.option(
                "--batch",
                default=1,
                show_default=True,
                type=click.IntRange(1),
                help="Batch for memory budgets.",
            ),
            click.option(
                "--kv-dtype",
                type=click.Choice(KV_NAMES),
                default="auto",
                show_default=True,
                help="How the cache stores tokens: the model's dtype (auto), or fp8 / int8 / int4 with "
                "per-token scales; memory budgets count its bytes.",
            ),
            click.option("--sink", default=4, show_default=True, type=click.IntRange(0)),
            click.option("--window", default=32, show_default=True, type=click.IntRange(0)),
            click.option("--policy", type=click.Choice(POLICIES), default="h2o", show_default=True),
            click.option(
                "--search/--no-search",
                default=True,
                show_default=True,
                help="Search the BaKlaVa parameters (--search-objective).",
            ),
            click.option(
                "--sharpness", type=click.FloatRange(0), help="Fix the BaKlaVa sharpness (skips the search)."
            ),
            click.option(
                "--floor-frac", type=click.FloatRange(0, 1), help="Fix the BaKlaVa floor (skips the search)."
            ),
        ],
    )


def engine_options(f):
    """--device, --kv-memory, --max-batch, --prefill-chunk: where a serving instance runs and the
    size of its engine's pool (``kv_memory`` stays the text typed: the repository records it)."""
    return _stack(
        f,
        [
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
            click.option(
                "--kv-memory",
                help="KV memory of an instance's pool, e.g. 40GiB (rows = memory / one sequence's "
                "budgeted cache) [default: 80% of free GPU memory on cuda].",
            ),
            click.option(
                "--max-batch",
                type=click.IntRange(1),
                help="Sequences served at once (pool rows) [default: from --kv-memory; 8 on cpu].",
            ),
            click.option(
                "--prefill-chunk",
                default=8192,
                show_default=True,
                type=click.IntRange(1),
                help="Prompt tokens per prefill call (the cache evicts after each).",
            ),
        ],
    )


def parse_pair(ctx, param, value):
    """Click callback: ``"LO,HI"`` -> ``(lo, hi)`` integers with ``1 <= lo <= hi`` (None stays None)."""
    if value is None:
        return None
    try:
        lo, hi = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two integers LO,HI, got {value!r}") from None
    if not 1 <= lo <= hi:
        raise click.BadParameter(f"expected 1 <= LO <= HI, got {value!r}")
    return lo, hi
