"""Score ratios between cells of a quality run, with paired bootstrap intervals over its prompts.

A cell is ``method@budget/kv_dtype`` (``full@1.0/auto`` is the full bf16 cache). Its score is the
quality benchmark's: each task's mean over its prompts, averaged over the tasks (perplexity
apart). A ratio ``A:B`` is resampled by prompt, the same prompts for both cells (they saw the same
prompt), within each task, so the interval shows how much the prompts drawn move it. Reads a
run's ``quality.json`` or the ``quality.partial.jsonl`` a run writes as it goes (what is left
of a run stopped early: only prompts both cells answered count)::

    python benchmarks/quality/paired_ratios.py RUN/quality.json baklava@0.3/fp8:baklava@0.3/auto \\
        baklava@0.2/int8:full@1.0/auto

Several runs of the same settings with different ``--seed`` s (so different prompts) pool their
prompts: give every run's file before the pairs.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import click


def load_rows(path: Path) -> list[dict]:
    """Per-prompt rows of a run: ``quality.json``'s ``rows`` or one JSON object a line."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)["rows"]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse_cell(text: str) -> tuple[str, float, str]:
    """``"baklava@0.3/fp8"`` -> ``("baklava", 0.3, "fp8")``."""
    try:
        method, rest = text.split("@")
        budget, kv_dtype = rest.split("/")
        return method, float(budget), kv_dtype
    except ValueError:
        raise click.BadParameter(f"{text!r} is not METHOD@BUDGET/KV_DTYPE, e.g. baklava@0.3/fp8") from None


def scores_by_prompt(runs: list[list[dict]]) -> dict[tuple, dict[tuple[str, tuple[int, int]], float]]:
    """``{cell: {(task, (run, setting, prompt index)): score}}`` over the answered tasks
    (perplexity apart) of one or more runs' rows: a prompt answered in both settings
    (query-aware and query-agnostic) counts as two answers, as the run's own table averages them."""
    cells: dict[tuple, dict] = {}
    for run, rows in enumerate(runs):
        for r in rows:
            if r["task"] != "ppl":
                cells.setdefault((r["method"], float(r["budget"]), r["kv_dtype"]), {})[
                    (r["task"], (run, r.get("setting", ""), r["index"]))
                ] = r["score"]
    return cells


def ratio(a: dict, b: dict, prompts: dict[str, list[int]]) -> float:
    """Score of cell ``a`` over cell ``b`` on ``prompts`` (task -> indices, repeats allowed)."""
    score = lambda cell: statistics.mean(statistics.mean(cell[(t, i)] for i in p) for t, p in prompts.items())  # noqa: E731
    return score(a) / score(b)


def paired_interval(
    a: dict, b: dict, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float, int]:
    """``(ratio, low, high, prompts)``: the ratio on the prompts both cells answered and its 95%
    paired bootstrap interval."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise click.ClickException("the two cells share no answered prompt")
    prompts: dict[str, list[int]] = {}
    for task, index in shared:
        prompts.setdefault(task, []).append(index)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        pick = {t: [rng.choice(p) for _ in p] for t, p in prompts.items()}
        try:
            draws.append(ratio(a, b, pick))
        except ZeroDivisionError:  # a draw where cell b scored nothing
            continue
    draws.sort()
    low, high = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
    return ratio(a, b, prompts), low, high, len(shared)


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="RUN... PAIR...")
@click.option("--resamples", default=2000, show_default=True, type=click.IntRange(100))
def main(args: tuple[str, ...], resamples: int) -> None:
    """Print each ratio A:B (PAIR, cells ``METHOD@BUDGET/KV_DTYPE``) of the RUN files' cells, their
    prompts pooled, with its 95% paired bootstrap interval."""
    runs = [Path(a) for a in args if Path(a).is_file()]
    pairs = [a for a in args if not Path(a).is_file()]
    for arg in pairs:
        if ":" not in arg:
            raise click.BadParameter(f"{arg!r} is neither a run's file nor a pair CELL:CELL")
    if not runs or not pairs:
        raise click.UsageError("give one or more RUN files, then one or more pairs CELL:CELL")
    run = " + ".join(map(str, runs))
    cells = scores_by_prompt([load_rows(path) for path in runs])
    for pair in pairs:
        if pair.count(":") != 1:
            raise click.BadParameter(f"{pair!r} is not CELL:CELL")
        names = pair.split(":")
        a, b = (parse_cell(n) for n in names)
        for name, cell in zip(names, (a, b), strict=True):
            if cell not in cells:
                known = ", ".join(f"{m}@{x}/{d}" for m, x, d in sorted(cells))
                raise click.ClickException(f"no cell {name} in {run} (it has {known})")
        value, low, high, n = paired_interval(cells[a], cells[b], resamples)
        click.echo(f"{pair}: {value:.4f} (95% {low:.3f}-{high:.3f}, {n} answers each)")


if __name__ == "__main__":
    main()
