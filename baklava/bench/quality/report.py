"""Aggregate quality rows into averages, target checks, a Markdown table and a plot.

Scores of the generation tasks are fractions of the expected answers found (0-1). The averages
weigh every task and length equally; ``ppl`` (lower is better) is reported on its own. Budget 1.0
is the full cache for every method (nothing to evict), so each method's line ends at that point.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from baklava.bench.quality import kv_memory
from baklava.bench.quality.intervals import LEVEL, target_intervals
from baklava.bench.quality.methods import METHODS
from baklava.runtime.shared_selection import SHARED_BELOW

BASELINES = ("uniform", "streaming", "layer", "pyramid")


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def summarize(rows: list[dict]) -> dict:
    """Per-cell means and the averages over tasks and lengths, per setting and over both.

    Returns ``{"cells": [...], "average": {setting: {method: {budget: score}}}, "ppl": {...}}``;
    setting ``"all"`` averages both settings.
    """
    cells = defaultdict(list)
    for r in rows:
        cells[(r["setting"], r["task"], r["length"], r["method"], r["budget"])].append(r["score"])
    cell_rows = [
        {
            "setting": k[0],
            "task": k[1],
            "length": k[2],
            "method": k[3],
            "budget": k[4],
            "score": _mean(v),
            "n": len(v),
        }
        for k, v in sorted(cells.items())
    ]
    full = {(c["setting"], c["task"], c["length"]): c["score"] for c in cell_rows if c["method"] == "full"}
    methods = [m for m in METHODS if any(c["method"] == m for c in cell_rows)]
    budgets = sorted({c["budget"] for c in cell_rows})

    def table(select) -> dict:
        out = {}
        for m in methods:
            line = {}
            for b in budgets:
                vals = [
                    full[(c["setting"], c["task"], c["length"])] if b == 1.0 else c["score"]
                    for c in cell_rows
                    if select(c)
                    and (c["method"] == m or (b == 1.0 and c["method"] == "full"))
                    and c["budget"] == b
                ]
                if vals:
                    line[b] = _mean(vals)
            out[m] = line
        return out

    gen = [c for c in cell_rows if c["task"] != "ppl"]
    settings = sorted({c["setting"] for c in gen})
    average = {s: table(lambda c, s=s: c["task"] != "ppl" and c["setting"] == s) for s in settings}
    if len(settings) > 1:
        average["all"] = table(lambda c: c["task"] != "ppl")
    ppl = table(lambda c: c["task"] == "ppl") if any(c["task"] == "ppl" for c in cell_rows) else {}
    return {"cells": cell_rows, "average": average, "ppl": ppl, "methods": methods, "budgets": budgets}


# issue 23: a quantized format keeps this share of the baseline format's score at budget 0.3
KV_DTYPE_GOALS = {"fp8": 0.99, "int8": 0.99, "int4": 0.97}


def kv_dtype_table(rows: list[dict], kv_dtypes: list[str]) -> dict:
    """Average score per method and budget for every KV dtype of the run (first = baseline), over
    all settings, and perplexity; ``{}`` for a run of one format."""
    if len(kv_dtypes) < 2:
        return {}
    out = {"formats": list(kv_dtypes), "average": {}, "ppl": {}}
    for kv in kv_dtypes:
        summary = summarize([r for r in rows if r.get("kv_dtype", "auto") == kv])
        averages = summary["average"]
        out["average"][kv] = averages.get("all") or next(iter(averages.values()), {})
        out["ppl"][kv] = summary["ppl"]
    return out


def kv_dtype_checks(table: dict, budget: float = 0.3) -> list[dict]:
    """:data:`KV_DTYPE_GOALS` for BaKlaVa at ``budget``: each format's score over the baseline's."""
    if not table:
        return []
    base = table["formats"][0]
    ref = table["average"][base].get("baklava", {}).get(budget)
    checks = []
    for kv in table["formats"][1:]:
        got = table["average"][kv].get("baklava", {}).get(budget)
        goal = KV_DTYPE_GOALS.get(kv)
        if goal is None or ref is None or got is None:
            continue
        value = round(got / ref, 4) if ref else None
        checks.append(
            {
                "target": f"baklava {budget:g} {kv} / {base}",
                "value": value,
                "goal": f">= {goal}",
                "met": value is not None and value >= goal,
            }
        )
    return checks


def _kv_dtype_lines(table: dict, budgets: list[float]) -> list[str]:
    formats, base = table["formats"], table["formats"][0]
    lines = [
        f"**Score by KV dtype (average of the settings; in brackets: over {base})**",
        "",
        "| method | budget | " + " | ".join(formats) + " |",
        "|---|---|" + "---|" * len(formats),
    ]
    for m in table["average"][base]:
        for b in budgets:
            if b == 1.0 and m != "full":  # every method at 1.0 is the full cache: one row says it
                continue
            ref = table["average"][base].get(m, {}).get(b)
            cells = []
            for kv in formats:
                got = table["average"][kv].get(m, {}).get(b)
                if got is None:
                    cells.append("")
                elif kv == base or not ref:
                    cells.append(f"{got:.3f}")
                else:
                    cells.append(f"{got:.3f} ({got / ref:.3f})")
            if any(cells):
                lines.append(f"| {m} | {b:g} | " + " | ".join(cells) + " |")
    lines.append("")
    found = kv_dtype_checks(table)
    if found:
        lines += ["Targets (KV dtype):", ""] + [f"- {describe(c)}" for c in found] + [""]
    return lines


def check_targets(average: dict[str, dict[float, float]]) -> list[dict]:
    """MISSION.md's quality targets on one average table ``{method: {budget: score}}``."""
    checks = []
    bak, full = average.get("baklava", {}), average.get("full", {}).get(1.0)

    def add(name, value, goal, ok):
        checks.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    if 0.3 in bak and full:
        ratio = bak[0.3] / full
        add("baklava@0.3 / full", round(ratio, 4), ">= 0.97", ratio >= 0.97)
    uni = average.get("uniform", {})
    if 0.1 in bak and 0.1 in uni:
        if uni[0.1] > 0:
            ratio = bak[0.1] / uni[0.1]
            add("baklava@0.1 / uniform@0.1", round(ratio, 4), ">= 1.5", ratio >= 1.5)
        else:  # a ratio over zero says nothing (and NaN is not JSON): met only if baklava scores at all
            add("baklava@0.1 / uniform@0.1", None, ">= 1.5 (uniform scored 0)", bak[0.1] > 0)
    for b in sorted(bak):
        if b > 0.3:
            continue
        for m in BASELINES:
            if b in average.get(m, {}):
                gap = bak[b] - average[m][b]
                add(f"baklava@{b} - {m}@{b}", round(gap, 4), ">= 0", gap >= -1e-12)
    return checks


def targets(summary: dict, rows: list[dict]) -> dict[str, list[dict]]:
    """:func:`check_targets` per setting, each check with its bootstrap ``interval`` over the
    prompts (:mod:`~baklava.bench.quality.intervals`) where one is defined."""
    bands = target_intervals(rows, check_targets)
    out = {}
    for name, table in summary["average"].items():
        checks = check_targets(table)
        for c in checks:
            if c["target"] in bands.get(name, {}):
                c["interval"] = bands[name][c["target"]]
        out[name] = checks
    return out


def describe(check: dict) -> str:
    """One target check as a line of text: value, interval where known, goal, verdict."""
    value = "n/a" if check["value"] is None else check["value"]
    band = ""
    if "interval" in check:
        band = f" ({LEVEL:.0%} bootstrap over prompts: {check['interval'][0]} to {check['interval'][1]})"
    return f"{check['target']} = {value}{band} (goal {check['goal']}): {'met' if check['met'] else 'MISSED'}"


def markdown(summary: dict, meta: dict, checks: dict[str, list[dict]] | None = None) -> str:
    """The tables BENCHMARKS.md quotes: average score per method and budget, per setting, then the
    target checks (``checks`` from :func:`targets`; without them, computed here, no intervals)."""
    budgets = summary["budgets"]
    lines = [
        f"Quality: {meta['model']}, lengths {meta['lengths']}, {meta['samples']} samples per task and length",
        "",
    ]
    if meta.get("baklava_params"):
        how = [f"{meta['scorer']} head scores"] if meta.get("scorer") else []  # older runs: unrecorded
        if meta.get("search_objective"):
            floors = meta.get("search_floors")
            among = f" (floors {'/'.join(f'{f:g}' for f in floors)})" if floors else ""
            how.append(f"parameters by {meta['search_objective']} perplexity{among}")
        selection = meta.get("baklava_selection")
        if selection:
            how.append(
                f"shared token selection below {SHARED_BELOW:g}"
                if selection == "auto"
                else f"{selection} token selection"
            )
        params = "; ".join(f"{b}: {p}" for b, p in meta["baklava_params"].items())
        lines += [f"BaKlaVa: {', '.join([*how, params])}", ""]
    blocks = list(summary["average"].items())
    if summary["ppl"]:
        blocks.append(("perplexity (lower is better)", summary["ppl"]))
    for name, table in blocks:
        lines += [f"**{name}**", "", "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |"]
        lines.append("|---" * (len(budgets) + 1) + "|")
        for m, line in table.items():
            cells = [f"{line[b]:.3f}" if b in line else "" for b in budgets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if checks is None:
        checks = {name: check_targets(table) for name, table in summary["average"].items()}
    for name, found in checks.items():
        if found:
            lines += [f"Targets ({name}):", ""]
            lines += [f"- {describe(c)}" for c in found]
            lines.append("")
    if summary.get("kv_dtypes"):
        lines += _kv_dtype_lines(summary["kv_dtypes"], budgets)
        lines += kv_memory.markdown_lines(summary.get("kv_memory", []))
        if meta.get("smooth_keys") and meta.get("balance_keys", False):
            lines += [
                "Quantized keys stored minus their head's mean key and balanced per channel against the "
                "queries (`--smooth-keys --balance-keys`).",
                "",
            ]
        elif meta.get("smooth_keys"):
            lines += ["Quantized keys stored minus their head's mean key (`--smooth-keys`).", ""]
        elif "smooth_keys" in meta:
            lines += ["Quantized keys stored as they are (`--no-smooth-keys`).", ""]
    lines += ["Per task (all settings, mean score):", ""]
    lines += _per_task(summary)
    return "\n".join(lines) + "\n"


def _per_task(summary: dict) -> list[str]:
    cells = defaultdict(list)
    for c in summary["cells"]:
        if c["task"] != "ppl":
            cells[(c["task"], c["method"], c["budget"])].append(c["score"])
    tasks = sorted({k[0] for k in cells})
    combos = [
        (m, b)
        for m in summary["methods"]
        for b in summary["budgets"]
        if (tasks and (tasks[0], m, b) in cells)
    ]
    head = "| method@budget | " + " | ".join(tasks) + " |"
    out = [head, "|---" * (len(tasks) + 1) + "|"]
    for m, b in combos:
        out.append(f"| {m}@{b:g} | " + " | ".join(f"{_mean(cells[(t, m, b)]):.2f}" for t in tasks) + " |")
    return out + [""]


def plot(summary: dict, meta: dict, path: str | os.PathLike) -> Path:
    """Score vs budget, one line per method, one panel per setting (+ perplexity, + score against
    KV bytes for a run of several KV dtypes: :mod:`kv_memory`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from baklava.atomic import save_figure_atomic

    panels = list(summary["average"].items())
    if summary["ppl"]:
        panels.append(("perplexity", summary["ppl"]))
    by_bytes = summary.get("kv_memory") or []
    # a run of several KV dtypes: score (and perplexity) against the bytes each cell stores
    metrics = ["score", "ppl"] if any(p["ppl"] is not None for p in by_bytes) else ["score"]
    extra = len(metrics) if by_bytes else 0
    fig, axes = plt.subplots(
        1, len(panels) + extra, figsize=(4.6 * (len(panels) + extra), 4.0), squeeze=False
    )
    for ax, metric in zip(axes[0][len(panels) :], metrics, strict=False):
        kv_memory.plot_panel(ax, by_bytes, metric)
    for ax, (name, table) in zip(axes[0], panels, strict=False):
        for m, line in table.items():
            if m == "full":
                ax.axhline(line.get(1.0, np.nan), color="black", ls=":", lw=1, label="full")
                continue
            xs = sorted(line)
            ax.plot(xs, [line[x] for x in xs], marker="o", ms=3, lw=2.2 if m == "baklava" else 1.2, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("KV budget (fraction of the full cache)")
        ax.set_ylabel("perplexity" if name == "perplexity" else "mean score")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{meta['model']}: quality vs KV budget (lengths {meta['lengths']})")
    return save_figure_atomic(fig, path)
