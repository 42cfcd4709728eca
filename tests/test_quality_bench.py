"""The quality benchmark: deterministic tasks, method capacities, the shared-prefill runner, the report."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from baklava.bench.quality import report
from baklava.bench.quality.methods import METHODS, MethodContext, adaptive_capacities, plan, total_slots
from baklava.bench.quality.runner import Combo, Runner, combos
from baklava.bench.quality.tasks import GENERATION_TASKS, PromptFormatter, Sample, build_suite, make_sample
from baklava.errors import BaklavaError
from baklava.eviction import EvictionConfig
from baklava.profiles.head_scores import HeadScores
from baklava.runtime import BudgetedCache, enable
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.packed_cache import BudgetedLayer


@pytest.fixture(scope="module")
def smol_tokenizer(smol):
    return smol.tokenizer


# ---------------------------------------------------------------------------------------- tasks
@pytest.mark.model
def test_suite_is_deterministic_in_the_seed(smol_tokenizer):
    tasks = [*GENERATION_TASKS, "ppl"]
    a = build_suite(smol_tokenizer, tasks, [1024], 2, seed=3)
    b = build_suite(smol_tokenizer, tasks, [1024], 2, seed=3)
    c = build_suite(smol_tokenizer, tasks, [1024], 2, seed=4)
    assert [(s.context_ids, s.query_ids, s.answers) for s in a] == [
        (s.context_ids, s.query_ids, s.answers) for s in b
    ]
    assert all(x.context_ids != y.context_ids for x, y in zip(a, c, strict=True))
    for s in a:
        assert 1024 - 32 <= s.num_tokens <= 1024, (s.task, s.num_tokens)


@pytest.mark.model
def test_answers_are_in_the_context_and_the_question_is_not(smol_tokenizer):
    fmt = PromptFormatter(smol_tokenizer)
    for task in GENERATION_TASKS:
        s = make_sample(task, 2048, 0, fmt)
        context, query = smol_tokenizer.decode(s.context_ids), smol_tokenizer.decode(s.query_ids)
        for answer in s.answers:
            assert answer in context, (task, answer)
        assert not any(a in query for a in s.answers if task != "vt")  # vt's query names the value only
        assert query.rstrip().endswith(("is", "are", "are:", "they are:")), query
    fwe = make_sample("fwe", 2048, 0, fmt)
    words = smol_tokenizer.decode(fwe.context_ids).split()
    counts = {w: words.count(w) for w in fwe.answers}
    others = max(words.count(w) for w in set(words) - set(fwe.answers) if w.isalpha() and w.islower())
    assert min(counts.values()) > others  # the answers really are the three most frequent words


def test_scoring_counts_the_answers_found():
    s = Sample("niah_multivalue", 100, 0, [], [], ["1234567", "7654321"])
    assert s.score(" 1234567 and 7654321.") == 1.0
    assert s.score(" 1234567, 1234567") == 0.5
    assert s.score(" nothing") == 0.0


# ---------------------------------------------------------------------------------------- methods
def _prefilled_full_cache(model, length=48, batch=2):
    enable(model)
    cache = BudgetedCache(np.full((2, 2), length + 8), EvictionConfig(sink=2, window=4))
    ids = torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, **forward_cache(model, cache))
    return cache


@pytest.mark.parametrize("method", METHODS)
def test_every_method_spends_the_budget_exactly(tiny_llama, method):
    full = _prefilled_full_cache(tiny_llama, length=200)
    scores = HeadScores(np.array([[1.0, 3.0], [0.5, 2.0]]), np.array([1.0, 2.0]))
    ctx = MethodContext(
        scores, EvictionConfig(sink=2, window=4), {0.3: {"sharpness": 1.0, "floor_frac": 0.1}}
    )
    caps, eviction = plan(method, 0.3, 200, ctx, full)
    assert caps.shape == (2, 2)
    if method == "full":
        assert (caps >= 200).all()
        return
    assert caps.sum() == total_slots(0.3, (2, 2), 200) == 240
    assert caps.min() >= 16 and caps.max() <= 200
    assert eviction.policy == ("ring" if method == "streaming" else "h2o")
    if method in ("uniform", "streaming"):
        assert caps.max() - caps.min() <= 1


def test_adakv_follows_where_the_top_tokens_are(tiny_llama):
    full = _prefilled_full_cache(tiny_llama, length=120)
    layer = full.layers[0]
    off = layer.offsets[1]
    layer.scores[:, off + 10 : off + 90] += 100.0  # head 1 of layer 0 holds the high-scoring tokens
    caps = adaptive_capacities(full, 4 * 40, 120, EvictionConfig(sink=2, window=4))
    assert caps.sum() == 160 and (caps.sum(1) == 80).all()  # the layer budgets stay uniform
    assert caps[0, 1] > caps[0, 0] >= 16


# ---------------------------------------------------------------------------------------- runner
class _Tok:
    """The runner needs only eos/pad ids, decode, and to encode the reconstruction prompt."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[5, 6, 7])

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_full_cache_decodes_exactly_like_generate_in_both_settings(tiny_llama):
    """The runner's full-cache row is plain greedy decoding, whether the question is read before or after."""
    g = torch.Generator().manual_seed(5)
    samples = []
    for i, n in enumerate((40, 33)):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        samples.append(Sample("niah_single", 48, i, ids[:-6], ids[-6:], ["x"], max_new_tokens=10))
    want = []
    for s in samples:
        prompt = torch.tensor([s.context_ids + s.query_ids])
        out = tiny_llama.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        tokens = out[0, prompt.shape[1] :].tolist()
        tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens  # the runner stops at EOS (id 2)
        want.append(" ".join(str(t) for t in tokens))
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(), {})
    runner = Runner(tiny_llama, _Tok(), ctx)
    for setting in ("query-aware", "query-agnostic"):
        rows = runner.run(samples, setting, [Combo("full", 1.0), Combo("uniform", 0.5)])
        got = [r["output"] for r in rows if r["method"] == "full"]
        assert got == want, setting
        assert [r["kv_fraction"] for r in rows] == [
            1.0,
            1.0,
            pytest.approx(0.5, abs=0.02),
            pytest.approx(0.5, abs=0.02),
        ]


def test_combos_run_full_once_and_every_method_below_one():
    todo = combos(["uniform", "baklava"], [1.0, 0.3, 0.1])
    assert todo == [
        Combo("full", 1.0),
        Combo("uniform", 0.1),
        Combo("uniform", 0.3),
        Combo("baklava", 0.1),
        Combo("baklava", 0.3),
    ]


# ---------------------------------------------------------------------------------------- report
def _rows(scores: dict) -> list[dict]:
    rows = []
    for (method, budget), values in scores.items():
        for task, value in zip(("niah_single", "vt"), values, strict=True):
            rows.append(
                {
                    "setting": "query-aware",
                    "task": task,
                    "length": 2048,
                    "method": method,
                    "budget": budget,
                    "score": value,
                }
            )
    return rows


def test_targets_are_checked_on_the_task_average():
    rows = _rows(
        {
            ("full", 1.0): (1.0, 0.5),
            ("uniform", 0.1): (0.2, 0.0),
            ("uniform", 0.3): (0.9, 0.5),
            ("baklava", 0.1): (0.4, 0.0),
            ("baklava", 0.3): (1.0, 0.46),
        }
    )
    summary = report.summarize(rows)
    avg = summary["average"]["query-aware"]
    assert avg["baklava"][0.3] == pytest.approx(0.73) and avg["baklava"][1.0] == pytest.approx(0.75)
    checks = {c["target"]: c for c in report.check_targets(avg)}
    assert checks["baklava@0.3 / full"]["value"] == pytest.approx(0.9733, abs=1e-4)
    assert checks["baklava@0.3 / full"]["met"]
    assert checks["baklava@0.1 / uniform@0.1"]["value"] == 2.0 and checks["baklava@0.1 / uniform@0.1"]["met"]
    assert checks["baklava@0.3 - uniform@0.3"]["met"]  # 0.73 vs 0.70
    rows[-1]["score"] = 0.2  # baklava@0.3 on vt drops: below full's 97% and below uniform
    checks = {c["target"]: c for c in report.check_targets(report.summarize(rows)["average"]["query-aware"])}
    assert not checks["baklava@0.3 / full"]["met"] and not checks["baklava@0.3 - uniform@0.3"]["met"]


def test_a_ratio_over_zero_is_not_a_number_in_the_report():
    zero = {"full": {1.0: 0.5}, "uniform": {0.1: 0.0}, "baklava": {0.1: 0.0}}
    checks = report.check_targets(zero)
    json.dumps(checks, allow_nan=False)  # strict JSON: raises on NaN or inf
    check = next(c for c in checks if c["target"].startswith("baklava@0.1 /"))
    assert check["value"] is None and not check["met"]
    zero["baklava"][0.1] = 0.2
    check = next(c for c in report.check_targets(zero) if c["target"].startswith("baklava@0.1 /"))
    assert check["met"]


def test_report_files(tmp_path):
    rows = _rows({("full", 1.0): (1.0, 0.5), ("uniform", 0.3): (0.5, 0.5), ("baklava", 0.3): (1.0, 0.5)})
    summary = report.summarize(rows)
    meta = {"model": "m", "lengths": [2048], "samples": 1}
    md = report.markdown(summary, meta)
    assert "| baklava | 0.750 | 0.750 |" in md and "| uniform | 0.500 | 0.750 |" in md
    assert "BaKlaVa:" not in md  # no BaKlaVa parameters recorded, no line
    params = {"0.3": {"sharpness": 1.0, "floor_frac": 0.1}}
    md = report.markdown(summary, meta | {"baklava_params": params, "scorer": "retrieval"})
    assert "BaKlaVa: retrieval head scores, 0.3: {'sharpness': 1.0, 'floor_frac': 0.1}" in md
    searched = {"search_objective": "reconstruction", "search_floors": [0.1, 0.3]}
    md = report.markdown(summary, meta | {"baklava_params": params, "scorer": "retrieval", **searched})
    assert "retrieval head scores, parameters by reconstruction perplexity (floors 0.1/0.3), 0.3: {" in md
    path = report.plot(summary, meta, tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(summary, default=float)  # the JSON document serialises


# ---------------------------------------------------------------------------------------- smoke
@pytest.mark.model
def test_cli_smoke_run_full_cache_finds_the_needle(tmp_path, smol):
    """A broken harness fails here: the full cache must answer the easy single-needle prompts."""
    from baklava.bench.cli import bench_main
    from tests.conftest import SMOL_FAST

    out = tmp_path / "q"
    args = [
        "quality",
        "--out",
        str(out),
        "--tasks",
        "niah_single",
        "--lengths",
        "1024",
        "--budgets",
        "0.3,1.0",
    ]
    args += ["--methods", "uniform,baklava", "--settings", "query-aware", "--limit", "2"]
    args += [a for a in SMOL_FAST if a != "--no-plot"]
    try:
        bench_main(args)
    except SystemExit as e:
        pytest.fail(f"baklava-bench quality exited with {e.code}")
    doc = json.loads((out / "quality.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * 3  # two prompts x (full, uniform@0.3, baklava@0.3)
    full = [r for r in rows if r["method"] == "full"]
    assert [r["score"] for r in full] == [1.0, 1.0], [r["output"] for r in full]
    assert all(r["answers"][0] in r["output"] for r in full)
    assert all(abs(r["kv_fraction"] - 0.3) < 0.01 for r in rows if r["method"] != "full")
    assert (out / "quality.md").read_text().startswith("Quality: smollm2-135m")
    assert doc["meta"]["scorer"] == "retrieval" and doc["meta"]["search_objective"] is None  # --no-search
    assert doc["meta"]["search_floors"] is None
    assert (out / "quality.png").stat().st_size > 10_000
    assert (out / "profile.json").is_file()


def test_cli_rejects_bad_options(tmp_path, capsys):
    from baklava.bench.cli import bench_main

    for bad, message in (
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--budgets", "0.3,2"], "budgets must be fractions"),
        (["--lengths", "1k"], "expected comma-separated integers"),
        (["--agnostic-scoring", "mean"], "'mean' is not one of 'reconstruct', 'window'"),
        (["--reconstruct-pool", "4"], "must be a positive odd number or 'auto', got 4"),
        (["--reconstruct-pool", "wide"], "'wide' is neither 'auto' nor a width"),
        (["--baklava-selection", "mine"], "'mine' is not one of 'auto', 'shared', 'own'"),
        (["--kv-dtypes", "int8,int3"], "unknown KV dtype 'int3'"),
        (["--kv-dtypes", "int8,int8"], "KV dtypes must be distinct"),
    ):
        with pytest.raises(SystemExit) as e:
            bench_main(["quality", "--out", str(tmp_path / "x"), "--model", "/nonexistent", *bad])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_same_prompts_give_the_same_scores(tiny_llama):
    g = torch.Generator().manual_seed(9)
    samples = [
        Sample("niah_single", 64, i, torch.randint(3, 96, (50,), generator=g).tolist(), [7, 8, 9], ["5"], 8)
        for i in range(3)
    ]
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4), {})
    todo = combos(["uniform", "streaming", "adakv"], [0.3, 1.0])
    first = Runner(tiny_llama, _Tok(), ctx).run(samples, "query-agnostic", todo)
    second = Runner(tiny_llama, _Tok(), ctx).run(samples, "query-agnostic", todo)
    assert first == second and len(first) == 3 * 4
    assert len({r["output"] for r in first}) > 1  # the methods do differ: the comparison is not vacuous


def test_runner_pools_reconstruction_scores_as_told(tiny_llama, monkeypatch):
    """``reconstruct_pool`` reaches the reconstruction pass (None: the eviction's own width)."""
    from baklava.bench.quality import runner as runner_module

    seen = []
    monkeypatch.setattr(
        runner_module, "score_by_reconstruction", lambda *a, pool_kernel=None, **k: seen.append(pool_kernel)
    )
    sample = Sample("niah_single", 64, 0, list(range(3, 53)), [7, 8, 9], ["5"], 2)
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4), {})
    for pool in (None, 1):
        Runner(tiny_llama, _Tok(), ctx, reconstruct_pool=pool).run(
            [sample], "query-agnostic", combos(["uniform"], [0.5])
        )
    assert seen == [None, 1]


def test_auto_pool_width_follows_the_budget(tiny_llama, monkeypatch):
    """``"auto"``: the reconstruction scores are pooled like the eviction below budget 0.2 and
    not at all from 0.2 on, re-pooled from the unpooled scores only when the width changes."""
    from baklava.bench.quality import runner as runner_module
    from baklava.runtime.reconstruction import pool_width

    assert [pool_width(b, 31) for b in (0.05, 0.1, 0.19, 0.2, 0.3, 1.0)] == [31, 31, 31, 1, 1, 1]
    raw = ["unpooled"]
    calls, active, widths = [], [31], {}
    monkeypatch.setattr(
        runner_module,
        "score_by_reconstruction",
        lambda *a, pool_kernel=None, **k: calls.append(pool_kernel) or raw,
    )
    monkeypatch.setattr(
        runner_module,
        "pool_scores",
        lambda cache, got, width: (active.append(width), calls.append((got, width))),
    )
    real_plan = runner_module.plan

    def plan(method, budget, *args):
        widths[budget] = active[-1]
        return real_plan(method, budget, *args)

    monkeypatch.setattr(runner_module, "plan", plan)
    sample = Sample("niah_single", 64, 0, list(range(3, 53)), [7, 8, 9], ["5"], 2)
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4, pool_kernel=31), {})
    Runner(tiny_llama, _Tok(), ctx, reconstruct_pool="auto").run(
        [sample], "query-agnostic", combos(["uniform"], [0.1, 0.3, 0.5, 0.05])
    )
    assert {b: w for b, w in widths.items() if b < 1} == {0.05: 31, 0.1: 31, 0.3: 1, 0.5: 1}
    assert calls == [None, (raw, 1)]  # scored once at the eviction's width, re-pooled once (budgets ascend)


@pytest.mark.parametrize(
    ("selection", "shared_at"), [("auto", [0.05, 0.1]), ("shared", [0.05, 0.1, 0.3]), ("own", [])]
)
def test_runner_shares_the_ranking_for_baklava_only(tiny_llama, monkeypatch, selection, shared_at):
    """Only BaKlaVa's heads share one ranking ("auto": below budget 0.2), and the full cache's own
    scores are back in place for the next method (so the baselines never see the shared ranking)."""
    from baklava.bench.quality import runner as runner_module

    seen, events = [], []  # events: ("share" | "compress", the full cache's scores at that call)
    real_share, real_compress = runner_module.share_scores, BudgetedCache.compressed

    def snapshot(cache):
        return [layer.scores.clone() for layer in cache.layers]

    def share(cache, caps, importance):
        events.append(("share", snapshot(cache)))
        seen.append(int(np.asarray(caps).sum()))
        real_share(cache, caps, importance)

    def compressed(self, caps, eviction=None):
        events.append(("compress", snapshot(self)))
        return real_compress(self, caps, eviction)

    monkeypatch.setattr(runner_module, "share_scores", share)
    monkeypatch.setattr(BudgetedCache, "compressed", compressed)
    sample = Sample("niah_single", 64, 0, list(range(3, 53)), [7, 8, 9], ["5"], 2)
    kv = np.array([[0.9, 0.1], [0.2, 0.0]])
    scores = HeadScores(kv_head=kv, layer=kv.mean(1), method="retrieval")
    ctx = MethodContext(scores, EvictionConfig(sink=2, window=4), {})
    budgets = [0.05, 0.1, 0.3]
    todo = [Combo("baklava", b) for b in budgets] + [Combo("uniform", 0.1)]
    Runner(tiny_llama, _Tok(), ctx, baklava_selection=selection).run([sample], "query-aware", todo)
    width = 50 + 3  # the prompt: context and question
    assert seen == [int(plan("baklava", b, width, ctx, None)[0].sum()) for b in shared_at]
    kinds = [kind for kind, _ in events]
    assert kinds.count("compress") == len(todo) and kinds.count("share") == len(shared_at)
    for i, (kind, own) in enumerate(events):
        if kind == "share":  # the shared compression, then whatever comes next sees the own scores again
            assert kinds[i + 1] == "compress"
            assert not all(torch.equal(a, b) for a, b in zip(own, events[i + 1][1], strict=True))
            assert all(torch.equal(a, b) for a, b in zip(own, events[i + 2][1], strict=True))


def test_pool_scores_pools_the_unpooled_scores(tiny_llama):
    """``score_by_reconstruction`` returns unpooled scores; ``pool_scores`` pools them at any width,
    matching a pass run at that width, and scores slots past a head's fill 0."""
    from baklava.runtime.reconstruction import pool_scores, prompt_ids, score_by_reconstruction

    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    caches = []
    for width in (1, 5):
        cache = BudgetedCache(np.full((2, 2), 48), EvictionConfig(sink=2, window=4, pool_kernel=width))
        enable(tiny_llama)
        with torch.inference_mode():
            tiny_llama(input_ids=ids, attention_mask=mask, **forward_cache(tiny_llama, cache))
            raw = score_by_reconstruction(tiny_llama, cache, ids, mask, prompt_ids(_Tok()))
        caches.append((cache, raw))
    (one, raw_one), (five, raw_five) = caches
    for a, b in zip(raw_one, raw_five, strict=True):
        torch.testing.assert_close(a, b)
    assert any(bool((l1.scores != l5.scores).any()) for l1, l5 in zip(one.layers, five.layers, strict=True))
    with torch.inference_mode():
        pool_scores(one, raw_one, 5)
    for l1, l5 in zip(one.layers, five.layers, strict=True):
        torch.testing.assert_close(l1.scores, l5.scores)
        assert bool((l1.scores[1, 40 - 5 : 48] == 0).all())  # head 0 of row 1: 35 live slots


def _run_doc(path, lengths, params=None, **meta_extra):
    """A quality.json as run_quality writes it, with rows for ``lengths`` (scores made up)."""
    rows = [
        {
            "setting": s,
            "task": "niah_single",
            "length": n,
            "index": 0,
            "method": m,
            "budget": b,
            "score": score,
        }
        for n in lengths
        for s in ("query-aware", "query-agnostic")
        for m, b, score in (("full", 1.0, 1.0), ("uniform", 0.3, 0.5), ("baklava", 0.3, 0.75))
    ]
    meta = {
        "model": "m", "dtype": "float32", "seed": 0, "samples": 1, "eviction": {"sink": 4},
        "baklava_params": params or {"0.3": {"sharpness": 1.0}}, "methods": ["full", "uniform", "baklava"],
        "budgets": [0.3, 1.0], "settings": ["query-aware", "query-agnostic"], "tasks": ["niah_single"],
        "lengths": lengths, "seconds": 1.0, "date": "2026-11-24", "command": "x", **meta_extra,
    }  # fmt: skip
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_merge_joins_runs_of_one_setup_and_refuses_others(tmp_path):
    from baklava.bench.quality.benchmark import merge_quality

    a = _run_doc(tmp_path / "a.json", [2048])
    b = _run_doc(tmp_path / "b.json", [8192])
    doc = merge_quality([a, b], tmp_path / "out", with_rows=False)
    assert doc["meta"]["lengths"] == [2048, 8192] and doc["meta"]["seconds"] == 2.0
    assert doc["summary"]["average"]["all"]["baklava"][0.3] == pytest.approx(0.75)
    written = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert "rows" not in written and (tmp_path / "out" / "quality.png").stat().st_size > 0
    with pytest.raises(BaklavaError, match="baklava_params"):
        merge_quality(
            [a, _run_doc(tmp_path / "c.json", [4096], {"0.3": {"sharpness": 2.0}})], tmp_path / "o2"
        )
    with pytest.raises(BaklavaError, match="overlaps"):
        merge_quality([a, _run_doc(tmp_path / "d.json", [2048, 4096])], tmp_path / "o3")
    with pytest.raises(BaklavaError, match="no per-prompt rows"):
        merge_quality([a, tmp_path / "out" / "quality.json"], tmp_path / "o4")


def test_merge_compares_the_token_selection(tmp_path):
    """A run written before the selection was recorded kept each head's own tokens."""
    from baklava.bench.quality.benchmark import merge_quality

    old = _run_doc(tmp_path / "old.json", [2048])
    own = _run_doc(tmp_path / "own.json", [4096], baklava_selection="own")
    auto = _run_doc(tmp_path / "auto.json", [8192], baklava_selection="auto")
    assert merge_quality([old, own], tmp_path / "ok", with_rows=False)["meta"]["lengths"] == [2048, 4096]
    with pytest.raises(BaklavaError, match="baklava_selection"):
        merge_quality([old, auto], tmp_path / "no")


def test_merge_compares_the_reconstruction_pool(tmp_path):
    """A run written before ``reconstruct_pool`` was recorded pooled like SnapKV (its eviction's
    width): it merges with a run that records that width and refuses one that records another."""
    from baklava.bench.quality.benchmark import merge_quality

    old = _run_doc(tmp_path / "old.json", [2048], eviction={"sink": 4, "pool_kernel": 31})
    same = _run_doc(
        tmp_path / "same.json", [4096], eviction={"sink": 4, "pool_kernel": 31}, reconstruct_pool=31
    )
    other = _run_doc(
        tmp_path / "other.json", [8192], eviction={"sink": 4, "pool_kernel": 31}, reconstruct_pool=1
    )
    assert merge_quality([old, same], tmp_path / "ok", with_rows=False)["meta"]["lengths"] == [2048, 4096]
    with pytest.raises(BaklavaError, match="reconstruct_pool"):
        merge_quality([old, other], tmp_path / "no")


@pytest.mark.parametrize("length", [160, 200, 256])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_benchmark_budget_at_a_length_is_an_export_with_that_max_context(length, fraction):
    """One meaning of budget: the benchmark's budget ``b`` on prompts of ``L`` tokens gives the
    capacities of ``baklava-export --budget b --max-context L`` (same profile, same searched
    parameters; the search depends on the fraction, not on the context)."""
    from baklava.profiles.pipeline import allocate
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from tests.conftest import tiny_config

    scores = HeadScores(np.array([[0.1, 0.5], [0.9, 0.3]]), np.array([0.2, 0.01]))
    profile = BudgetProfile(ModelInfo.from_config(tiny_config(), "tiny"), scores, EvictionConfig())
    params = {"sharpness": 2.0, "floor_frac": 0.5}
    exported = allocate(profile, str(fraction), max_context=length, params=params, search=False)
    benchmarked, _ = plan(
        "baklava", fraction, length, MethodContext(scores, EvictionConfig(), {fraction: params}), None
    )
    np.testing.assert_array_equal(exported.capacities, benchmarked)


def test_below_the_floors_the_benchmark_spends_the_floor_and_export_refuses():
    """Where ``budget x L`` is under 16 slots a head, the benchmark raises every head to the floor
    (its row then costs more than the budget says) and export refuses with one line."""
    from baklava.errors import BaklavaError
    from baklava.profiles.pipeline import allocate
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from tests.conftest import tiny_config

    scores = HeadScores(np.array([[0.1, 0.5], [0.9, 0.3]]), np.array([0.2, 0.01]))
    assert total_slots(0.1, (2, 2), 64) == 4 * 16 > round(0.1 * 4 * 64)
    profile = BudgetProfile(ModelInfo.from_config(tiny_config(), "tiny"), scores, EvictionConfig())
    with pytest.raises(BaklavaError, match="smaller than the floor"):
        allocate(profile, "0.1", max_context=64, params={"sharpness": 1.0}, search=False)


def test_chunked_mode_prefills_each_cache_as_the_engine_does(tiny_llama, monkeypatch):
    """``prefill_chunk``: a method's cache is what the runtime's chunked prefill (the engine's
    path) leaves in a cache of the method's capacities: same kept tokens, same first logits; no
    reconstruction pass; every method forward is at most one chunk long."""
    from baklava.bench.quality import runner as runner_module
    from baklava.runtime import prefill

    monkeypatch.setattr(runner_module, "score_by_reconstruction", lambda *a, **k: pytest.fail("re-read"))
    ids = torch.randint(3, 96, (58,), generator=torch.Generator().manual_seed(2)).tolist()
    sample = Sample("niah_single", 64, 0, ids[:50], ids[50:], ["5"], 4)
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4), {})
    seen = {}
    real_greedy, real_forward = Runner._greedy, Runner._forward

    def greedy(self, cache, logits, mask, steps):
        kept = [(layer.positions.clone(), layer.fill.clone()) for layer in cache.layers]  # before decoding
        seen.setdefault("cache", []).append((cache.capacities, kept, logits.clone()))
        return real_greedy(self, cache, logits, mask, steps)

    monkeypatch.setattr(Runner, "_greedy", greedy)
    monkeypatch.setattr(
        Runner,
        "_forward",
        lambda self, x, *a, **k: (
            seen.setdefault("q", []).append(x.shape[1]) or real_forward(self, x, *a, **k)
        ),
    )
    for setting in ("query-aware", "query-agnostic"):
        seen.clear()
        Runner(tiny_llama, _Tok(), ctx, prefill_chunk=16).run([sample], setting, combos(["uniform"], [0.3]))
        caps, kept, logits = seen["cache"][-1]  # after the full cache's row
        want = BudgetedCache(caps, ctx.eviction)
        if setting == "query-aware":
            want_logits = prefill(tiny_llama, want, torch.tensor([ids]), chunk=16)
        else:  # the context in chunks, then the question in chunks
            prefill(tiny_llama, want, torch.tensor([ids[:50]]), chunk=16)
            want_logits = prefill(tiny_llama, want, torch.tensor([ids[50:]]), chunk=16)
        assert int(caps.max()) < 58  # every head evicted
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
        for (positions, fill), layer in zip(kept, want.layers, strict=True):
            assert torch.equal(positions, layer.positions) and torch.equal(fill, layer.fill)
        assert seen["q"][0] == (58 if setting == "query-aware" else 50)  # the full prefill (for planning)
        assert max(seen["q"][1:]) <= 16  # the method's own cache: one chunk at a time


def test_compress_context_keeps_what_the_benchmark_keeps(tiny_llama, monkeypatch):
    """``runtime.compress_context`` (for users: a context compressed before its question) leaves
    the tokens the quality benchmark's query-agnostic BaKlaVa cache holds before its question:
    full prefill, reconstruction scores, shared selection below 0.2, compressed."""
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo
    from baklava.runtime.context_compression import compress_context

    ids = torch.randint(3, 96, (208,), generator=torch.Generator().manual_seed(4)).tolist()
    sample = Sample("niah_single", 200, 0, ids[:200], ids[200:], ["5"], 2)
    scores = HeadScores(np.array([[0.1, 0.5], [0.9, 0.3]]), np.array([0.2, 0.01]))
    ctx = MethodContext(
        scores, EvictionConfig(sink=2, window=4), {0.1: {"sharpness": 1.0, "floor_frac": 0.5}}
    )
    seen = {}
    real_compress = Runner._compress

    def compress(self, full, combo, caps, eviction):
        cache = real_compress(self, full, combo, caps, eviction)
        seen[combo.method] = (caps, [(layer.positions.clone(), layer.fill.clone()) for layer in cache.layers])
        return cache

    monkeypatch.setattr(Runner, "_compress", compress)
    Runner(tiny_llama, _Tok(), ctx).run([sample], "query-agnostic", combos(["baklava"], [0.1]))
    caps, kept = seen["baklava"]
    info = ModelInfo.from_config(tiny_llama.config, "tiny")
    profile = BudgetProfile(info, scores, ctx.eviction, np.asarray(caps))
    cache = compress_context(tiny_llama, _Tok(), profile, ids[:200])  # keeps ~0.1: shared, pooled
    assert int(np.asarray(caps).max()) < 0.2 * 200  # every head evicted most of the context
    own = compress_context(tiny_llama, _Tok(), profile, ids[:200], budget=0.5)  # own, unpooled
    assert any(
        not torch.equal(a.positions, b.positions) for a, b in zip(cache.layers, own.layers, strict=True)
    )
    for (positions, fill), layer in zip(kept, cache.layers, strict=True):
        assert torch.equal(fill, layer.fill) and torch.equal(positions, layer.positions)


# ---------------------------------------------------------------------------------------- KV dtype
def test_every_cache_of_a_run_stores_in_its_kv_dtype(tiny_llama):
    g = torch.Generator().manual_seed(4)
    ppl = [
        Sample("ppl", 64, i, torch.randint(3, 96, (40,), generator=g).tolist(), [], [], 0) for i in range(2)
    ]
    for s, cont in zip(ppl, torch.randint(3, 96, (2, 12), generator=g).tolist(), strict=True):
        s.query_ids.extend(cont)
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4), {})
    todo = combos(["uniform"], [0.3])
    got = {}
    for kv in ("auto", "int8"):
        runner = Runner(tiny_llama, _Tok(), ctx, kv_dtype=kv)
        assert runner._full_cache(8).kv_format.name == kv
        got[kv] = runner.run(ppl, "-", todo)
        assert {r["kv_dtype"] for r in got[kv]} == {kv}
    for a, b in zip(got["auto"], got["int8"], strict=True):
        assert a["method"] == b["method"] and a["score"] != b["score"]  # int8 slots change the perplexity
        assert abs(a["score"] - b["score"]) / a["score"] < 0.05
    chunked = Runner(tiny_llama, _Tok(), ctx, kv_dtype="int8", prefill_chunk=16).run(ppl, "-", todo)
    assert [r["kv_dtype"] for r in chunked] == ["int8"] * 4


def test_smoothed_keys_change_the_int8_perplexity_and_the_report_says_so(tiny_llama, monkeypatch):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (52,), generator=g).tolist()
    ppl = [Sample("ppl", 64, 0, ids[:40], [], [], 0)]
    ppl[0].query_ids.extend(ids[40:])
    ctx = MethodContext(HeadScores.constant(2, 2), EvictionConfig(sink=2, window=4), {})
    scores = {}
    for smooth in (False, True):
        monkeypatch.setattr(BudgetedLayer, "smooth_keys", smooth)  # what run_quality sets from --smooth-keys
        runner = Runner(tiny_llama, _Tok(), ctx, kv_dtype="int8")
        assert runner._full_cache(8).layers[0].smooth_keys is smooth
        scores[smooth] = runner.run(ppl, "-", combos(["uniform"], [0.3]))[0]["score"]
    assert scores[True] != scores[False] and abs(scores[True] / scores[False] - 1) < 0.05
    rows = [r | {"kv_dtype": kv} for kv in ("auto", "int8") for r in _rows({("baklava", 0.3): (1.0, 0.5)})]
    summary = report.summarize(rows) | {"kv_dtypes": report.kv_dtype_table(rows, ["auto", "int8"])}
    meta = {"model": "m", "lengths": [64], "samples": 1}
    assert "Quantized keys stored minus their head's mean key" in report.markdown(
        summary, meta | {"smooth_keys": True}
    )
    assert "Quantized keys stored as they are" in report.markdown(summary, meta | {"smooth_keys": False})


def test_the_report_compares_each_kv_dtype_with_the_first():
    rows = []
    for kv, scale in (("auto", 1.0), ("int8", 0.995), ("int4", 0.9)):
        for r in _rows(
            {("full", 1.0): (1.0, 0.8), ("baklava", 0.3): (1.0, 0.6), ("uniform", 0.3): (0.5, 0.5)}
        ):
            rows.append(r | {"kv_dtype": kv, "score": r["score"] * scale})
    table = report.kv_dtype_table(rows, ["auto", "int8", "int4"])
    assert table["average"]["int4"]["baklava"][0.3] == pytest.approx(0.8 * 0.9)
    checks = {c["target"]: c for c in report.kv_dtype_checks(table)}
    assert checks["baklava 0.3 int8 / auto"]["value"] == 0.995 and checks["baklava 0.3 int8 / auto"]["met"]
    assert checks["baklava 0.3 int4 / auto"]["value"] == 0.9 and not checks["baklava 0.3 int4 / auto"]["met"]
    summary = report.summarize([r for r in rows if r["kv_dtype"] == "auto"]) | {"kv_dtypes": table}
    md = report.markdown(summary, {"model": "m", "lengths": [2048], "samples": 1})
    assert "| baklava | 0.3 | 0.800 | 0.796 (0.995) | 0.720 (0.900) |" in md
    assert "baklava 0.3 int4 / auto = 0.9 (goal >= 0.97): MISSED" in md
    assert report.kv_dtype_table(rows, ["auto"]) == {}


def test_the_kv_dtype_table_shows_the_full_cache_once():
    rows = [
        r | {"kv_dtype": kv}
        for kv in ("auto", "int8")
        for r in _rows({("full", 1.0): (1.0, 0.5), ("baklava", 0.3): (1.0, 0.5)})
    ]
    table = report.kv_dtype_table(rows, ["auto", "int8"])
    lines = [x for x in report._kv_dtype_lines(table, [0.3, 1.0]) if x.startswith("| ")][1:]
    assert [x.split(" | ")[:2] for x in lines] == [["| full", "1"], ["| baklava", "0.3"]]
