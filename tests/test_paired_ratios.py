"""benchmarks/quality/paired_ratios.py: score ratios between a quality run's cells, resampled by
prompt (the ratio quoted for every quantized-cache target of issue 23)."""

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "paired_ratios.py"
spec = importlib.util.spec_from_file_location("paired_ratios", SCRIPT)
paired_ratios = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_ratios)


def _row(task, index, method, budget, kv_dtype, score):
    return dict(task=task, index=index, method=method, budget=budget, kv_dtype=kv_dtype, score=score)


def _run():
    """Two tasks of four prompts. bf16 answers 3/4 of each; fp8 misses one more prompt of task a.
    Task means: bf16 (0.75, 0.75), fp8 (0.5, 0.75): 0.625 / 0.75."""
    rows = []
    for task in ("a", "b"):
        for i in range(4):
            rows.append(_row(task, i, "baklava", 0.3, "auto", float(i < 3)))
            rows.append(_row(task, i, "baklava", 0.3, "fp8", float(i < (2 if task == "a" else 3))))
    rows.append(_row("ppl", 0, "baklava", 0.3, "fp8", 5.0))  # perplexity is not a score
    return rows


def test_the_ratio_averages_tasks_and_its_interval_holds_it(tmp_path):
    cells = paired_ratios.scores_by_prompt([_run()])
    value, low, high, n = paired_ratios.paired_interval(
        cells[("baklava", 0.3, "fp8")], cells[("baklava", 0.3, "auto")]
    )
    assert value == pytest.approx(0.625 / 0.75) and n == 8
    assert low <= value <= high <= 1.0  # fp8 never answers a prompt bf16 misses


def test_the_command_reads_partial_runs_and_names_missing_cells(tmp_path):
    partial = tmp_path / "quality.partial.jsonl"
    rows = _run()
    partial.write_text("\n".join(json.dumps(r) for r in rows[:-3]) + "\n")  # stopped early: b's last prompt
    run = CliRunner().invoke(paired_ratios.main, [str(partial), "baklava@0.3/fp8:baklava@0.3/auto"])
    assert run.exit_code == 0, run.output
    # task a: 0.5 / 0.75; task b, prompts 0-2: 1.0 / 1.0 -> 0.75 / 0.875
    assert (
        run.output.startswith("baklava@0.3/fp8:baklava@0.3/auto: 0.8571 (95% ")
        and "7 answers each" in run.output
    )
    full = tmp_path / "quality.json"
    full.write_text(json.dumps({"meta": {}, "rows": rows}))
    missing = CliRunner().invoke(paired_ratios.main, [str(full), "baklava@0.2/int8:baklava@0.3/auto"])
    assert missing.exit_code != 0 and "no cell baklava@0.2/int8" in missing.output
    bad = CliRunner().invoke(paired_ratios.main, [str(full), "baklava0.3fp8:x"])
    assert bad.exit_code != 0 and "METHOD@BUDGET/KV_DTYPE" in bad.output


def test_runs_of_other_seeds_pool_their_prompts(tmp_path):
    first, second = tmp_path / "seed0.jsonl", tmp_path / "seed1.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in _run()) + "\n")
    # a second prompt set where fp8 answers what bf16 does
    rows = [dict(r, score=float(r["index"] < 3)) if r["task"] != "ppl" else r for r in _run()]
    second.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = CliRunner().invoke(
        paired_ratios.main, [str(first), str(second), "baklava@0.3/fp8:baklava@0.3/auto"]
    )
    assert run.exit_code == 0, run.output
    # task a: (0.5 + 0.75) / 2 = 0.625 against 0.75; task b: 0.75 against 0.75 -> 0.6875 / 0.75
    assert (
        run.output.startswith("baklava@0.3/fp8:baklava@0.3/auto: 0.9167 (95% ")
        and "16 answers each" in run.output
    )
    nothing = CliRunner().invoke(paired_ratios.main, [str(tmp_path / "none.json"), "baklava@0.3/fp8:x"])
    assert nothing.exit_code != 0 and "neither a run's file nor a pair" in nothing.output


def test_both_settings_of_a_prompt_count_as_two_answers(tmp_path):
    """A run of both settings answers each prompt twice; neither answer may overwrite the other
    (the script once kept the last setting's alone)."""
    rows = [dict(r, setting="query-aware") for r in _run()]
    # query-agnostic: fp8 answers every prompt bf16 does
    rows += [
        dict(r, setting="query-agnostic", score=float(r["index"] < 3)) for r in _run() if r["task"] != "ppl"
    ]
    cells = paired_ratios.scores_by_prompt([rows])
    value, _, _, n = paired_ratios.paired_interval(
        cells[("baklava", 0.3, "fp8")], cells[("baklava", 0.3, "auto")]
    )
    assert n == 16 and value == pytest.approx(0.6875 / 0.75)  # task a: (0.5 + 0.75) / 2 against 0.75
