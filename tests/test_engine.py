"""The batching engine: rows of one slot pool, token-identical to serving a request alone.

CPU with the tiny random Llama and capacities small enough that every head evicts; the same
checks run on the GPU (``gpu`` marker) with the Triton kernels, the fused layers and CUDA graphs.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from baklava import kv_format
from baklava.errors import BaklavaError
from baklava.eviction import EvictionConfig
from baklava.runtime import BudgetedCache, decode_one_token, prefill
from baklava.runtime.engine import Engine
from baklava.runtime.engine_step import buckets
from baklava.runtime.packed_cache import BudgetedLayer
from baklava.runtime.sampling import SamplingParams, TextPieces
from baklava.runtime.slot_pool import SlotPool, bytes_per_sequence, rows_for_memory
from baklava.serving.engine_loop import EngineLoop
from tests.conftest import _tiny_tokenizer, tiny_config

CAPS = [[8, 24], [16, 12]]  # every head evicts within the prompts below (3 .. 60 tokens)
EVICTION = EvictionConfig(sink=2, window=4, obs_window=4)
CHUNK = 16


def _prompts(lengths=(5, 40, 17, 60, 3, 33), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 96, (n,), generator=g).tolist() for n in lengths]


def _engine(model, rows, device="cpu", **kwargs):
    kwargs = {"prefill_chunk": CHUNK, "chat": False, **kwargs}
    return Engine.from_capacities(model, _tiny_tokenizer(), CAPS, EVICTION, max_batch=rows, **kwargs)


def _reference(model, prompt, steps):
    """Greedy tokens from the runtime's own path: a fresh cache, chunked prefill, one-token steps."""
    cache = BudgetedCache(CAPS, EVICTION)
    logits = prefill(model, cache, torch.tensor([prompt]), chunk=CHUNK)
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax(-1)))
        logits = decode_one_token(model, cache, torch.tensor([[out[-1]]]))
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def test_engine_matches_the_reference_alone_and_beside_others(model):
    prompts, params = _prompts(), SamplingParams(max_tokens=20, ignore_eos=True)
    want = [_reference(model, p, 20) for p in prompts]
    alone = [_engine(model, 1).generate([p], params)[0] for p in prompts]
    # 4 rows for 6 requests: rows are reused, requests queue, prefills interleave with decode steps
    together = _engine(model, 4, max_prefill_tokens=20).generate(prompts, params)
    assert alone == want
    assert together == want


def test_every_head_evicted_and_rows_hold_exactly_their_capacity(model):
    engine = _engine(model, 2)
    engine.generate(_prompts((60, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    for layer, caps in zip(engine.pool.cache.layers, CAPS, strict=True):
        assert layer.fill.tolist() == [caps, caps]  # full: 64 and 44 tokens seen, caps <= 24
        assert layer.keys.shape == (2, sum(caps), 16)
    assert engine.pool.kv_bytes() == 2 * bytes_per_sequence(CAPS, 16, torch.float32)


def test_a_new_request_sees_nothing_of_the_row_it_reuses(model):
    engine = _engine(model, 1)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first, second = _prompts((50, 9))
    engine.generate([first], params)
    assert engine.generate([second], params)[0] == _reference(model, second, 8)
    layer = engine.pool.cache.layers[0]
    assert int(layer.valid_seen[0]) == 9 + 8 - 1  # prompt + fed tokens of the second request only
    assert int(layer.positions[0].max()) == 9 + 8 - 2


def test_sampling_with_a_seed_is_reproducible_and_independent_of_batching(model):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    prompts = _prompts((12, 30, 7))
    alone = [_engine(model, 1).generate([p], params)[0] for p in prompts]
    together = _engine(model, 3).generate(prompts, params)
    assert together == alone
    assert alone[0] != _engine(model, 1).generate([prompts[0]], SamplingParams(max_tokens=12))[0]


def test_eos_length_and_cancel_free_rows(model):
    engine = _engine(model, 2)
    greedy = _reference(model, _prompts((20,))[0], 12)
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    engine.eos = greedy[k]  # the first greedy token seen there for the first time ends the request
    stop = engine.submit(_prompts((20,))[0], SamplingParams(max_tokens=50))
    cancel = engine.submit(_prompts((25,))[0], SamplingParams(max_tokens=50, ignore_eos=True))
    events, cancelled_at = [], None
    while engine.has_work():
        events += engine.step()
        if cancelled_at is None and sum(e.request_id == cancel for e in events) >= 3:
            engine.cancel(cancel)
            cancelled_at = len(events)
    last = {e.request_id: e for e in events if e.finished}
    assert last[stop].finish_reason == "stop" and last[stop].token_ids == [greedy[k]]
    assert [t for e in events if e.request_id == stop for t in e.token_ids] == greedy[: k + 1]
    assert last[cancel].finish_reason == "cancelled"
    assert sum(e.request_id == cancel for e in events[cancelled_at:]) == 1  # only the final event
    assert engine.running == 0 and sorted(engine._free) == [0, 1]
    assert not engine.pool.step_rows.any()


def test_text_pieces_join_to_the_decoded_tokens(model):
    engine = _engine(model, 2)
    rid = engine.submit("the a of to and in is", SamplingParams(max_tokens=10, ignore_eos=True))
    events = list(engine.run())
    ids = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert events[-1].finished and events[-1].request_id == rid


class _NoBackend:
    """A tokenizer without a fast backend: TextPieces decodes the whole sequence each step."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


@pytest.mark.parametrize("incremental", [True, False])
def test_text_pieces_never_split_a_character_and_join_to_the_decode(smol, incremental):
    tok = smol.tokenizer
    ids = tok(
        "Grüße 😀 naïve café — 漢字テスト\n  def f(x):\n\treturn x ** 2 <|im_end|> ok",
        add_special_tokens=False,
    )["input_ids"]
    pieces = TextPieces(tok if incremental else _NoBackend(tok))
    assert (pieces._stream is not None) == incremental
    out = [pieces.push(t) for t in ids] + [pieces.flush()]
    assert "".join(out) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in out)
    assert sum(p == "" for p in out[:-1]) >= 5  # multi-byte characters span several tokens
    assert "<|im_end|>" not in "".join(out)


def test_bad_requests_are_refused_with_one_line(model):
    engine = _engine(model, 1)
    with pytest.raises(BaklavaError, match="exceeds the context of 256"):
        engine.submit(list(range(4, 250)), SamplingParams(max_tokens=20))
    with pytest.raises(BaklavaError, match="empty"):
        engine.submit([], SamplingParams())
    engine.submit([5, 6], request_id="x")
    with pytest.raises(BaklavaError, match="already in flight"):
        engine.submit([5, 6], request_id="x")


def test_pool_size_from_memory():
    per = bytes_per_sequence(CAPS, 16, torch.bfloat16)
    assert per == 60 * 2 * 16 * 2
    assert rows_for_memory(10 * per + per - 1, CAPS, 16, torch.bfloat16) == 10
    with pytest.raises(BaklavaError, match="holds no sequence"):
        rows_for_memory(per - 1, CAPS, 16, torch.bfloat16)
    pool = SlotPool(CAPS, EVICTION, 3, head_dim=16, q_heads=4, dtype=torch.bfloat16, device="cpu")
    assert pool.kv_bytes() == 3 * per


def test_row_views_share_the_pools_head_tables():
    """An admission's row view reads the pool layer's offset / capacity tables instead of
    building its own (on a GPU each build was a host sync per layer per admission)."""
    pool = SlotPool(CAPS, EVICTION, 3, head_dim=16, q_heads=4, dtype=torch.bfloat16, device="cpu")
    for layer, view in zip(pool.cache.layers, pool.row_view(1).layers, strict=True):
        assert view.device_offsets is layer.device_offsets
        assert view.device_capacities is layer.device_capacities
        assert (
            view.device_offsets.tolist() == layer.offsets
            and view.device_capacities.tolist() == layer.capacities
        )


def test_swapping_rows_exchanges_every_state_tensor_bit_for_bit():
    pool = SlotPool(
        CAPS, EVICTION, 5, head_dim=32, q_heads=4, dtype=torch.float32, device="cpu", kv_format="int8"
    )
    g = torch.Generator().manual_seed(0)
    for layer in pool.cache.layers:
        for name in layer.state_names:
            t = getattr(layer, name)
            t.copy_(torch.randint(-100, 100, t.shape, generator=g).to(t.dtype))
    pool.step_rows.copy_(torch.tensor([True, False, True, False, False]))
    before = {
        (i, n): getattr(layer, n).clone()
        for i, layer in enumerate(pool.cache.layers)
        for n in layer.state_names
    }
    assert len(before) == 2 * 10  # int8 payload and scales, META, the smoothing state
    pool.swap_rows([4, 0], [1, 3])
    order = [3, 4, 2, 0, 1]  # row r now holds what row order[r] held
    for (i, name), old in before.items():
        assert torch.equal(getattr(pool.cache.layers[i], name), old[order]), name
    assert pool.step_rows.tolist() == [False, False, True, True, False]
    with pytest.raises(ValueError, match="distinct rows"):
        pool.swap_rows([1, 2], [2, 3])


def test_decoding_rows_move_down_so_a_step_runs_the_smallest_bucket(model):
    """Requests end at scattered rows and new ones take the lowest free rows, so decoding rows
    scatter as the pool drains; the engine moves them down (prefilling rows move up in exchange,
    mid-prompt) and every request still gets the tokens it gets alone."""
    engine = _engine(model, 4, max_prefill_tokens=16)
    moved_mid_prompt = []
    real = engine.pool.moved_view
    engine.pool.moved_view = lambda view, row: moved_mid_prompt.append(row) or real(view, row)
    prompts = _prompts((5, 70, 17, 60, 3, 33, 90, 120, 7, 9, 11))
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 20, 5, 30, 2, 9, 14, 6, 25, 4, 8)]
    ids = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    got = {rid: [] for rid in ids}
    while engine.has_work():
        for event in engine.step():
            got[event.request_id] += event.token_ids
    counts = engine.decode_counts
    assert counts["compactions"] >= 3 and counts["rows_moved"] >= counts["compactions"] and moved_mid_prompt
    assert counts["rows_decoded"] == sum(sp.max_tokens for sp in params) - len(
        params
    )  # first tokens: prefill
    assert counts["rows_run"] < 1.2 * counts["rows_decoded"]
    alone = _engine(model, 4)
    for rid, prompt, sp in zip(ids, prompts, params, strict=True):
        assert got[rid] == alone.generate([prompt], sp)[0]
    assert sorted(engine._free) == [0, 1, 2, 3] and engine.running == 0


def test_buckets_cover_every_row_count():
    assert buckets(1) == [1]
    assert buckets(6) == [1, 2, 4, 6]
    assert buckets(8) == [1, 2, 4, 8]


def test_engine_loop_streams_cancels_and_survives_a_broken_callback(model):
    engine = _engine(model, 2)
    done = {name: threading.Event() for name in ("a", "b", "bad", "long")}
    events: dict[str, list] = {name: [] for name in done}
    stop_long = threading.Event()

    def collect(name):
        def on_event(event):
            events[name].append(event)
            if event.finished:
                done[name].set()

        return on_event

    def broken(event):
        raise RuntimeError("client went away")

    with EngineLoop(engine) as loop:
        loop.submit(_prompts((30,))[0], SamplingParams(max_tokens=6, ignore_eos=True), collect("a"))
        loop.submit(list(range(4, 300)), SamplingParams(max_tokens=4), collect("bad"))
        loop.submit(_prompts((10,))[0], SamplingParams(max_tokens=500, ignore_eos=True), broken)
        loop.submit(
            _prompts((12,))[0],
            SamplingParams(max_tokens=200, ignore_eos=True),
            collect("long"),
            stop_long.is_set,
        )
        loop.submit(_prompts((8,))[0], SamplingParams(max_tokens=5, ignore_eos=True), collect("b"))
        assert done["a"].wait(60) and done["bad"].wait(60)
        stop_long.set()
        assert done["long"].wait(60) and done["b"].wait(60)
    assert [t for e in events["a"] for t in e.token_ids] == _reference(model, _prompts((30,))[0], 6)
    assert events["bad"][-1].error and "exceeds the context" in events["bad"][-1].error
    assert events["long"][-1].finish_reason == "cancelled"
    assert len([t for e in events["long"] for t in e.token_ids]) < 200
    assert engine.running == 0  # the broken callback's request was cancelled too


def test_engine_loop_merges_the_pieces_a_slow_client_has_not_taken(model):
    """The engine never waits for a callback: while one is busy, its request's next events merge
    into one (text and tokens joined, in order), and nothing is lost."""
    engine = _engine(model, 2)
    events, done = [], threading.Event()

    def slow(event):
        events.append(event)
        if len(events) == 1:
            time.sleep(1.0)  # the engine runs on meanwhile
        if event.finished:
            done.set()

    prompt = _prompts((20,))[0]
    with EngineLoop(engine) as loop:
        loop.submit(prompt, SamplingParams(max_tokens=24, ignore_eos=True), slow)
        assert done.wait(60)
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == _reference(model, prompt, 24)
    assert len(events) < 24  # some events carried several tokens
    assert max(len(e.token_ids) for e in events) > 1
    assert events[-1].finished and events[-1].finish_reason == "length"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8", "int4"])
def test_engine_on_the_gpu_matches_itself_alone_with_graphs_and_kernels(kv_dtype):
    torch.manual_seed(0)
    cfg = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=512, intermediate_size=1024)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    prompts = _prompts((5, 40, 17, 60, 3, 33, 90, 120))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    # alone: one request at a time in a pool of the same rows (the decode kernels tile by the pool's
    # rows, so a pool of another size sums a row's attention in another order: an int4 token can
    # round differently on one unit in the last place, and the tokens part ways)
    single = _engine(model, 6, kv_format=kv_dtype)
    alone = [single.generate([p], params)[0] for p in prompts]
    engine = _engine(model, 6, max_prefill_tokens=32, kv_format=kv_dtype)
    assert engine.step_fn.graphed
    assert engine.pool.cache.layers[0].slot_names[2:] == (
        () if kv_dtype is None else ("key_scales", "value_scales")
    )
    together = engine.generate(prompts, params)
    assert together == alone
    eager = _engine(model, 6, cuda_graphs=False, kv_format=kv_dtype).generate(prompts, params)
    assert eager == alone


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the interpreter's launches (the GPU test above: tokens)"
)
def test_a_step_over_some_rows_runs_the_split_kernel_chosen_for_the_whole_pool(monkeypatch):
    """The decode split kernel is chosen once for a pool's rows: a step over one row runs what a
    step over all of them runs, so a row's attention is summed the same way alone as beside
    others. (A one-row step once took the Triton kernel and a wider one the mma kernel: int8 /
    fp8 requests on a GPU left their tokens alone after 13-20 steps.) The interpreter runs no mma
    kernel: ``mma_split`` says yes for every pool wider than a row, and the launch is recorded
    and then run with the Triton kernel."""
    from baklava.kernels import decode_attention

    launched, real = [], decode_attention.packed_decode_attention

    def recorded(*args, kernel="auto", **kwargs):
        launched.append((args[0].shape[0], kernel))
        return real(*args, kernel="triton", **kwargs)

    monkeypatch.setattr(decode_attention, "mma_split", lambda fmt, d, g, dev, rows=None: rows != 1)
    monkeypatch.setattr(decode_attention, "packed_decode_attention", recorded)
    monkeypatch.setattr(BudgetedLayer, "decode_kernels", "triton")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(hidden_size=128)).eval()  # head_dim 32: one the mma kernel takes
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for rows, kernel in ((4, "mma"), (1, "triton")):
        launched.clear()
        _engine(model, rows, kv_format="int8").generate(_prompts((5,)), params)
        assert launched and set(launched) == {(1, kernel)}  # one row a step, the pool's kernel


def test_engine_benchmark_counts_every_token_and_splits_its_phases(model):
    from baklava.bench.serve_engine import markdown, run_engine, run_transformers_serial, workload

    work = workload(5, (4, 40), (3, 9), np.arange(4, 24), seed=2)
    engine = _engine(model, 2, prefill_chunk=16)
    row = run_engine(engine, work, "baklava engine, budget 1.0", progress=False, budget=1.0)
    want = sum(w.max_tokens for w in work)
    assert row["tokens"] == want and row["requests"] == len(work)
    decode_tokens = want - len(work)  # every request's first token comes from its prefill
    assert row["decode_tokens_per_s"] == pytest.approx(
        decode_tokens / engine.phase_seconds["decode"], abs=0.1
    )
    assert row["prefill_s"] > 0 and row["decode_s"] > 0 and row["rows"] == 2
    assert row["prefill_tokens"] == sum(len(w.prompt) for w in work)  # the warm-up's not counted
    assert row["cuda_allocator"] == {}  # counted on CUDA only
    serial = run_transformers_serial(model, work[:2], progress=False)
    assert serial["tokens"] == sum(w.max_tokens for w in work[:2])
    meta = {"model": "tiny", "requests": 5, "prompt_lengths": [4, 40], "new_tokens": [3, 9]}
    table = markdown([row, serial], meta | {"kv_memory_gib": 0.0, "gpu": "cpu", "date": "today"})
    line = next(x for x in table.splitlines() if x.startswith("| baklava engine"))
    assert f"| {row['prefill_s']} / {row['decode_s']} | {row['decode_tokens_per_s']} |" in line
    # every decode step decoded at most the pool's 2 rows and ran over a bucket covering them
    steps = row["decode_steps"]
    assert steps >= decode_tokens / 2 and engine.decode_counts["rows_decoded"] == decode_tokens
    assert 1 <= row["mean_rows_decoded"] <= row["mean_rows_run"] <= 2
    assert row["decode_step_ms"] == pytest.approx(1e3 * engine.phase_seconds["decode"] / steps, abs=0.01)
    assert f"| {row['mean_rows_decoded']} / {row['mean_rows_run']}, {row['decode_step_ms']} |" in line
    ratio = row["tokens_per_s"] / serial["tokens_per_s"]
    assert f"| 1.00x | {ratio:.1f}x |" in line


def test_the_engine_bench_serves_the_same_work_through_the_serving_loop(model):
    from baklava.bench.serve_engine import run_engine, run_engine_loop, workload

    work = workload(5, (4, 40), (3, 9), np.arange(4, 24), seed=2)
    engine = _engine(model, 2, prefill_chunk=16)
    direct = run_engine(engine, work, "direct", progress=False, budget=1.0)
    looped = run_engine_loop(engine, work, "loop", 500.0, progress=False, budget=1.0)
    assert looped["tokens"] == direct["tokens"] == sum(w.max_tokens for w in work)
    assert looped["requests"] == len(work) and looped["callback_us"] == 500.0
    assert looped["prefill_tokens"] == direct["prefill_tokens"] == sum(len(w.prompt) for w in work)
    assert looped["ttft_p50_s"] > 0 and looped["itl_p50_ms"] > 0
    # every callback held the GIL 0.5 ms: at most one event a request per step, so the run took
    # at least (events / requests) x 0.5 ms; the engine is free again afterwards
    assert looped["wall_s"] >= (direct["tokens"] / len(work)) * 5e-4
    assert not engine.has_work() and engine.running == 0


def test_repeated_runs_are_each_compared_with_budget_one_s_same_run(model):
    from baklava.bench.serve_engine import _engine_rows, markdown, workload

    work = workload(3, (4, 20), (2, 4), np.arange(4, 24), seed=1)
    engine = _engine(model, 2, prefill_chunk=16)
    full = _engine_rows(engine, work, "e, budget 1.0", False, [], 2, budget=1.0)
    small = _engine_rows(engine, work, "e, budget 0.3", False, [], 2, budget=0.3)
    assert [r["system"] for r in full] == ["e, budget 1.0, run 1", "e, budget 1.0, run 2"]
    assert [r["run"] for r in small] == [1, 2]
    assert all(r["tokens"] == sum(w.max_tokens for w in work) for r in full + small)
    meta = {"model": "tiny", "requests": 3, "prompt_lengths": [4, 20], "new_tokens": [2, 4]}
    table = markdown(full + small, meta | {"kv_memory_gib": 0.0, "gpu": "cpu", "date": "today"})
    for k, row in enumerate(small):
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['system']} |"))
        assert f"| {row['tokens_per_s'] / full[k]['tokens_per_s']:.2f}x |" in line


def test_the_engine_bench_parses_callback_costs():
    from baklava.bench.cli import bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main(["engine", "--loop-callback-us", "0,fast"])
    assert exit_info.value.code == 2


def _profile(model):
    from baklava.profiles.head_scores import HeadScores
    from baklava.profiles.profile_file import BudgetProfile, ModelInfo

    scores = HeadScores(np.array([[0.9, 0.1], [0.3, 0.6]]), np.array([0.5, 0.5]))
    return BudgetProfile(ModelInfo.from_config(model.config, "tiny"), scores, EVICTION, np.array(CAPS))


def test_a_context_is_compressed_the_benchmarks_way_then_the_prompt_follows(model):
    from baklava.runtime.context_compression import compress_context

    tok, profile = _tiny_tokenizer(), _profile(model)
    context, question, other = _prompts((70, 9, 33), seed=5)
    cache = compress_context(model, tok, profile, context)
    assert int(cache.fill_levels().min()) == 8  # the context alone fills (and evicts) every head
    logits, want = prefill(model, cache, torch.tensor([question])), []
    for _ in range(6):
        want.append(int(logits.argmax(-1)))
        logits = decode_one_token(model, cache, torch.tensor([[want[-1]]]))

    engine = Engine.from_profile(model, tok, profile, max_batch=2, prefill_chunk=CHUNK, chat=False)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    plain = engine.submit(other, params)
    rid = engine.submit(question, params, context=context)
    out = {plain: [], rid: []}
    for event in engine.run():
        out[event.request_id] += event.token_ids
    assert out[rid] == want
    assert out[plain] == _reference(model, other, 6)  # its neighbour is untouched
    # a chunked prefill of context + question keeps other tokens: the comparison can fail
    assert _reference(model, context + question, 6) != want

    bare = _engine(model, 1)
    with pytest.raises(BaklavaError, match="build the engine with from_profile"):
        bare.submit(question, params, context=context)
    with pytest.raises(BaklavaError, match=r"prompt \(251 tokens\) \+ max_tokens \(6\) exceeds"):
        engine.submit(question, params, context=list(range(4, 246)))


def test_an_int8_engine_serves_what_the_int8_reference_cache_gives(model, monkeypatch):
    """The engine's pool stores int8 payload + scales, sized by those bytes; it serves token for
    token what the reference store (float32 values rounded to the int8 grid) gives."""
    per = {fmt: bytes_per_sequence(CAPS, 16, torch.float32, fmt) for fmt in ("auto", "int8")}
    assert per["int8"] == int(np.asarray(CAPS).sum()) * 2 * (16 + 2)  # payload + one float16 scale
    assert rows_for_memory(10 * per["auto"], CAPS, 16, torch.float32, "int8") == 10 * 64 // 18
    prompts = _prompts((40, 17, 60), seed=7)
    engine = Engine.from_capacities(
        model,
        _tiny_tokenizer(),
        CAPS,
        EVICTION,
        max_batch=3,
        prefill_chunk=CHUNK,
        chat=False,
        kv_format="int8",
    )
    assert engine.pool.cache.kv_format.name == "int8"
    assert engine.pool.kv_bytes() == 3 * per["int8"]
    assert all(layer.keys.dtype == torch.int8 for layer in engine.pool.cache.layers)
    got = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    monkeypatch.setattr(BudgetedLayer, "quantized_storage", False)
    for prompt, tokens in zip(prompts, got, strict=True):
        cache = BudgetedCache(CAPS, EVICTION, "int8")
        logits, want = prefill(model, cache, torch.tensor([prompt]), chunk=CHUNK), []
        for _ in range(8):
            want.append(int(logits.argmax(-1)))
            logits = decode_one_token(model, cache, torch.tensor([[want[-1]]]))
        assert tokens == want
        stored = torch.cat([layer.keys for layer in cache.layers], 1).float()
        assert torch.equal(kv_format.round_trip(stored, kv_format.parse("int8")), stored)  # int8 grid values


def test_the_soak_fills_every_row_at_the_end_and_sends_a_prompt_over_the_context(monkeypatch):
    from baklava.bench import soak as soak_module
    from baklava.bench.serve_load import RequestResult

    sent = []

    def fake_stream(url, model, prompt, max_tokens, timeout):
        sent.append(prompt)
        return RequestResult(True, 0.0, 0.0, 1)

    monkeypatch.setattr(soak_module, "stream_request", fake_stream)
    result = soak_module.soak("http://nowhere", duration_s=0, clients=1, rows=150)
    assert len(sent) == 150 and result["after_soak_rows_ok"] == 150  # more rows than built-in prompts
    longest = max(
        len(b.get("text_input", "").split())
        for b in soak_module.malformed_bodies(32768)
        if isinstance(b, dict)
    )
    assert longest == 32769


def test_a_warm_up_leaves_every_row_free_and_changes_no_answer(model):
    """A served instance warms its engine up (the prefill and commit kernels compile before the
    first request on CUDA): afterwards its rows are free and requests get what a cold engine gives."""
    cold, warm = _engine(model, 3), _engine(model, 3)
    warm.warm_up()  # prompts of 8 and CHUNK + 8 tokens (and one more): a later chunk, evictions
    assert not warm.has_work() and warm.running == 0 and sorted(warm._free) == [0, 1, 2]
    assert warm.phase_seconds == {"prefill": 0.0, "decode": 0.0} and warm.prefill_tokens == 0
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert warm.generate(_prompts(), params) == cold.generate(_prompts(), params)
    near_context = _engine(model, 1)
    near_context.warm_up([10_000])  # capped at the context (256) less room for two tokens
    assert not near_context.has_work()


def test_engine_loop_reports_where_the_engine_thread_spent_its_time(model):
    from baklava.serving.engine_loop import format_stats

    engine, reports, done = _engine(model, 2), [], threading.Event()
    with EngineLoop(engine, stats_every_s=0.0, on_stats=reports.append) as loop:
        for n, prompt in enumerate(_prompts((30, 12, 9))):
            last = n == 2
            loop.submit(
                prompt,
                SamplingParams(max_tokens=5, ignore_eos=True),
                lambda e, last=last: last and e.finished and done.set(),
            )
        assert done.wait(60)
        time.sleep(0.3)  # the delivery thread's last callbacks
    assert sum(r["taken"] for r in reports) == 3 and sum(r["finished"] for r in reports) == 3
    assert sum(r["steps"] for r in reports) >= 5  # three requests of five tokens on two rows
    assert all(r["prefill_s"] + r["decode_s"] <= r["step_s"] + 1e-3 for r in reports)
    assert all(r["rows"] == 2 and 0 <= r["running"] <= 2 for r in reports)
    assert sum(r["prefill_tokens"] for r in reports) == sum(len(p) for p in _prompts((30, 12, 9)))
    assert all(0 < r["longest_step_s"] <= r["step_s"] for r in reports)
    assert sum(r["delivered"] for r in reports) <= 3 * 5
    assert "rows busy" in format_stats(reports[0])


def test_a_served_pool_is_read_back_from_the_instances_ready_lines(model):
    from baklava.serving.engine_loop import format_ready, served_rows

    line = format_ready(_engine(model, 3))
    assert line.startswith("baklava engine ready: 3 rows of ") and "GiB of KV on cpu" in line
    assert served_rows(f"I1204 loading\n{line}\n{format_ready(_engine(model, 5))}\n") == 8  # two instances
    assert served_rows("I1204 no engine here") is None


def test_the_engines_reports_are_summed_back_from_a_log():
    from baklava.serving.engine_loop import engine_seconds, format_stats

    report = dict(window_s=10.04, steps=12, step_s=9.5, prefill_s=6.12, decode_s=3.0, idle_s=0.25, taken=7,
                  finished=5, delivered=40, running=3, rows=8, waiting=2, prefill_tokens=9000,
                  longest_step_s=0.25)  # fmt: skip
    second = report | {"steps": 3, "longest_step_s": 1.5}
    log = f"I1204 model loaded\n{format_stats(report)}\nnoise\n{format_stats(second)}\n"
    assert engine_seconds(log) == {
        "window_s": 20.0, "steps": 15, "step_s": 19.0, "prefill_s": 12.2, "decode_s": 6.0, "idle_s": 0.4,
        "taken": 14, "finished": 10, "prefill_tokens": 18000, "longest_step_s": 1.5,
    }  # fmt: skip
    cuda = report | {"allocator": {"segments_allocated": 3, "segments_freed": 1, "alloc_retries": 0}}
    assert "CUDA allocator: 3 segments allocated, 1 freed, 0 retries" in format_stats(cuda)
    spent = engine_seconds(f"{format_stats(cuda)}\n{format_stats(cuda)}\n")
    assert spent["allocator"] == {"segments_allocated": 6, "segments_freed": 2, "alloc_retries": 0}
    assert spent["steps"] == 24
    assert engine_seconds("no reports here") is None
