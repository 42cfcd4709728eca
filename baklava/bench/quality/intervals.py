"""Bootstrap intervals for the quality targets: how far a figure moves with the luck of the prompts.

A run scores a few prompts per task and length (4 on Qwen at 16k-32k), so a target such as
``baklava@0.3 / full`` carries sampling noise of its own. The prompts are resampled with
replacement within each (task, length); a drawn prompt counts for every method, budget and
setting at once (they were all scored on the same prompts: a paired bootstrap). Each resample
goes through the same averaging and the same :func:`~baklava.bench.quality.report.check_targets`
as the reported figure; the interval is the central ``level`` of the resampled values.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def target_intervals(
    rows: list[dict], check_targets, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """``{setting: {target: [low, high]}}`` for the generation tasks of ``rows`` (``"all"`` pools
    both settings, as the averages do). ``check_targets`` maps ``{method: {budget: score}}`` to
    the target checks. Targets whose value is undefined in a resample are left out."""
    gen = [r for r in rows if r["task"] != "ppl"]
    if not gen or any("index" not in r for r in gen):  # no prompt identity: nothing to pair on
        return {}
    prompts = defaultdict(set)  # (task, length) -> prompt indices
    scores = defaultdict(dict)  # (setting, task, length) -> {(method, budget, index): score}
    for r in gen:
        prompts[(r["task"], r["length"])].add(r["index"])
        scores[(r["setting"], r["task"], r["length"])][(r["method"], r["budget"], r["index"])] = r["score"]
    rng = np.random.default_rng(seed)
    # positions into each (task, length)'s sorted prompt list, shared by both settings: paired
    order = {cell: sorted(idx) for cell, idx in sorted(prompts.items())}
    draws = {cell: rng.integers(0, len(idx), size=(resamples, len(idx))) for cell, idx in order.items()}
    settings = sorted({s for s, _, _ in scores})
    groups = {s: [c for c in scores if c[0] == s] for s in settings}
    if len(settings) > 1:
        groups["all"] = list(scores)
    out = {}
    for name, cells in groups.items():
        means = [_cell_means(scores[c], order[c[1:]], draws[c[1:]]) for c in sorted(cells)]
        keys = sorted({k for m in means for k in m})
        # each (method, budget) averaged over the cells that have it, as report.summarize does
        averages = {k: np.mean([m[k] for m in means if k in m], axis=0) for k in keys}
        values = defaultdict(list)
        for i in range(resamples):
            table = defaultdict(dict)
            for (method, budget), avg in averages.items():
                table[method][budget] = float(avg[i])
            for check in check_targets(dict(table)):
                if check["value"] is not None:
                    values[check["target"]].append(check["value"])
        tail = (1 - level) / 2 * 100
        out[name] = {
            t: [round(float(np.percentile(v, tail)), 4), round(float(np.percentile(v, 100 - tail)), 4)]
            for t, v in values.items()
        }
    return out


def _cell_means(cell: dict, order: list, draws: np.ndarray) -> dict[tuple, np.ndarray]:
    """Mean score of each (method, budget) in one cell under every resample ``[resamples]``."""
    keys = sorted({(method, budget) for method, budget, _ in cell})
    where = {index: j for j, index in enumerate(order)}
    table = np.full((len(keys), len(order)), np.nan)
    for (method, budget, index), score in cell.items():
        table[keys.index((method, budget)), where[index]] = score
    picked = table[:, draws]  # [keys, resamples, prompts]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a key missing every drawn prompt: NaN
        means = np.nanmean(picked, axis=2)
    return {k: means[i] for i, k in enumerate(keys)}
