"""Quality at equal KV memory: each cell's bytes, the frontier, the table and the plot."""

import pytest

from baklava.bench.quality import kv_memory, report


def _table():
    # the shape of report.kv_dtype_table: scores by format, method and budget
    average = {
        "auto": {"full": {1.0: 0.80}, "baklava": {0.1: 0.50, 0.3: 0.78, 1.0: 0.80}},
        "int8": {"full": {1.0: 0.79}, "baklava": {0.1: 0.49, 0.3: 0.77, 1.0: 0.79}},
        "int4": {"full": {1.0: 0.70}, "baklava": {0.1: 0.40, 0.3: 0.66, 1.0: 0.70}},
    }
    ppl = {
        kv: {m: {b: 10 - s for b, s in line.items()} for m, line in t.items()} for kv, t in average.items()
    }
    return {"formats": ["auto", "int8", "int4"], "average": average, "ppl": ppl}


def test_bytes_count_the_scales_against_a_full_bf16_cache():
    assert kv_memory.bytes_share("auto", 0.3, 128) == pytest.approx(0.3)
    assert kv_memory.bytes_share("int8", 1.0, 128) == pytest.approx(130 / 256)  # + a float16 scale
    assert kv_memory.bytes_share("int4", 0.3, 64) == pytest.approx(0.3 * 36 / 128)  # + top, 2 codes


def test_cells_are_sorted_by_bytes_and_the_frontier_is_the_best_so_far():
    points = kv_memory.points(_table(), head_dim=64)
    shares = [p["kv_bytes_share"] for p in points]
    assert shares == sorted(shares)
    # every method at 1.0 is the full cache: one cell a format, not two
    assert sum(p["budget"] == 1.0 for p in points) == 3
    by_cell = {(p["method"], p["budget"], p["kv_dtype"]): p for p in points}
    int4_03 = by_cell[("baklava", 0.3, "int4")]
    assert int4_03["kv_bytes_share"] == pytest.approx(0.3 * 36 / 128)
    assert int4_03["ppl"] == pytest.approx(10 - 0.66)
    # 0.3 at int4 stores fewer bytes than 0.1 in bf16 and scores higher: 0.1 bf16 is dominated
    assert int4_03["kv_bytes_share"] < by_cell[("baklava", 0.1, "auto")]["kv_bytes_share"]
    assert int4_03["frontier"] and not by_cell[("baklava", 0.1, "auto")]["frontier"]
    best, lowest = float("-inf"), float("inf")
    for p in points:
        assert p["frontier"] == (p["score"] > best)
        assert p["ppl_frontier"] == (p["ppl"] < lowest)
        best, lowest = max(best, p["score"]), min(lowest, p["ppl"])
    assert by_cell[("full", 1.0, "auto")]["frontier"]  # the most bytes, the best score


def test_no_table_or_no_head_size_gives_no_cells():
    assert kv_memory.points({}, 64) == [] and kv_memory.points(_table(), None) == []
    assert kv_memory.markdown_lines([]) == []


def test_the_report_has_the_table_and_a_panel(tmp_path):
    points = kv_memory.points(_table(), head_dim=64)
    lines = kv_memory.markdown_lines(points)
    assert lines[0].startswith("**Quality at equal KV memory**")
    rows = [line for line in lines if line[:4] in ("| 0.", "| 1.")]
    assert len(rows) == len(points)
    assert "| 0.084 | baklava | 0.3 | int4 | **0.660** | **9.340** |" in rows
    assert "| 0.100 | baklava | 0.1 | auto | 0.500 | 9.500 |" in rows  # dominated on both
    summary = {
        "average": {"all": _table()["average"]["auto"]},
        "ppl": {},
        "kv_memory": points,
    }
    path = report.plot(summary, {"model": "m", "lengths": [2048]}, tmp_path / "q.png")
    assert path.stat().st_size > 10_000  # two panels drawn, written whole
