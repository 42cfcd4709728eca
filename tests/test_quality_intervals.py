"""Bootstrap intervals of the quality targets: paired over prompts, the same averaging as the report."""

import json

import numpy as np
import pytest

from baklava.bench.quality import report
from baklava.bench.quality.intervals import target_intervals


def _rows(per_method: dict, settings=("query-aware",), tasks=("niah_single", "vt")) -> list[dict]:
    """``{(method, budget): [score of prompt 0, 1, ...]}``, the same scores in every task and setting."""
    return [
        {"setting": s, "task": t, "length": 2048, "index": i, "method": m, "budget": b, "score": float(v)}
        for s in settings
        for t in tasks
        for (m, b), scores in per_method.items()
        for i, v in enumerate(scores)
    ]


def test_equal_scores_on_every_prompt_give_a_point_interval():
    rows = _rows({("full", 1.0): [0.5] * 6, ("uniform", 0.3): [0.25] * 6, ("baklava", 0.3): [0.5] * 6})
    band = target_intervals(rows, report.check_targets)["query-aware"]
    assert band["baklava@0.3 / full"] == [1.0, 1.0]
    assert band["baklava@0.3 - uniform@0.3"] == [0.25, 0.25]


def test_the_bootstrap_is_paired_over_prompts():
    # baklava scores exactly what the full cache scores on each prompt, and the prompts differ a
    # lot: paired, every resample's ratio is 1; resampled apart, it would spread widely
    luck = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    rows = _rows({("full", 1.0): luck, ("baklava", 0.3): luck, ("uniform", 0.3): [0.0, 1.0] * 4})
    band = target_intervals(rows, report.check_targets)["query-aware"]
    assert band["baklava@0.3 / full"] == [1.0, 1.0]
    lo, hi = band["baklava@0.3 - uniform@0.3"]  # unrelated prompts: a real spread around 0
    assert lo < 0 < hi


def test_the_interval_brackets_the_reported_value_and_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    widths = []
    for n in (8, 128):
        full = rng.uniform(0.5, 1.0, n)
        rows = _rows({("full", 1.0): full, ("baklava", 0.3): full * rng.uniform(0.6, 1.0, n)})
        value = report.check_targets(report.summarize(rows)["average"]["query-aware"])[0]["value"]
        lo, hi = target_intervals(rows, report.check_targets)["query-aware"]["baklava@0.3 / full"]
        assert lo < value < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_rows_without_a_prompt_index_get_no_intervals():
    rows = _rows({("full", 1.0): [1.0, 0.0], ("baklava", 0.3): [1.0, 1.0]})
    for r in rows:
        del r["index"]
    assert target_intervals(rows, report.check_targets) == {}
    checks = report.targets(report.summarize(rows), rows)["query-aware"]
    assert checks and not any("interval" in c for c in checks)


def test_both_settings_pool_into_all_and_ppl_is_left_out():
    rows = _rows(
        {("full", 1.0): [1.0, 0.0, 1.0, 0.0], ("baklava", 0.3): [1.0, 0.0, 0.0, 0.0]},
        settings=("query-aware", "query-agnostic"),
    )
    rows += [{**r, "task": "ppl", "setting": "-", "score": 12.0} for r in rows[:4]]
    bands = target_intervals(rows, report.check_targets)
    assert set(bands) == {"query-agnostic", "query-aware", "all"}
    assert all(0.0 <= lo <= 0.5 <= hi <= 1.0 for lo, hi in [b["baklava@0.3 / full"] for b in bands.values()])


def test_report_carries_the_intervals(tmp_path):
    rows = _rows({("full", 1.0): [1.0, 0.0, 1.0, 1.0], ("baklava", 0.3): [1.0, 0.0, 0.0, 1.0]})
    summary = report.summarize(rows)
    checks = report.targets(summary, rows)
    ratio = next(c for c in checks["query-aware"] if c["target"] == "baklava@0.3 / full")
    assert ratio["value"] == pytest.approx(0.6667, abs=1e-4) and len(ratio["interval"]) == 2
    json.dumps(checks, allow_nan=False)
    md = report.markdown(summary, {"model": "m", "lengths": [2048], "samples": 4}, checks)
    lo, hi = ratio["interval"]
    assert (
        f"- baklava@0.3 / full = 0.6667 (95% bootstrap over prompts: {lo} to {hi}) (goal >= 0.97): MISSED"
        in md
    )
