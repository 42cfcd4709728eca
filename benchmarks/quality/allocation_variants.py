# Fixed BaKlaVa allocation parameters on the quality suite, scored beside uniform without the search:
# every variant compresses the same full-cache prefill, so they differ only in capacities. GPU:
#   python benchmarks/quality/allocation_variants.py MODEL OUT.json LENGTHS BUDGETS SAMPLES VARIANTS
# VARIANTS: ";"-separated "uniform" or "sharpness,floor_frac[,min_cap]" (min_cap default 16).
import collections
import json
import sys
import time

import numpy as np
import torch

from baklava.bench.quality import methods as M
from baklava.bench.quality import runner as R
from baklava.bench.quality.tasks import build_suite
from baklava.model_zoo import load_model
from baklava.profiles import pipeline
from baklava.profiles.allocators import make_allocator

model, out = sys.argv[1], sys.argv[2]
lengths = [int(x) for x in sys.argv[3].split(",")]
budgets = [float(x) for x in sys.argv[4].split(",")]
limit, variants = int(sys.argv[5]), sys.argv[6].split(";")
tasks = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe", "vt"]  # as run
dev = "cuda" if torch.cuda.is_available() else "cpu"
lm = load_model(model, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, progress=False)
lm.model.to(dev)
prof = pipeline.score(lm, pipeline.CalibrationSettings(), progress=False)  # default (retrieval) scores
caps_log, base_plan = {}, M.plan


def plan(method, fraction, context, ctx, full):  # "v:<variant>" methods; the rest as the benchmark
    if not method.startswith("v:"):
        return base_plan(method, fraction, context, ctx, full)
    spec, total = method[2:], M.total_slots(fraction, ctx.scores.shape, context)
    if spec == "uniform":
        alloc, min_cap = make_allocator("uniform"), 16
    else:
        p = [float(x) for x in spec.split(",")]
        alloc = make_allocator("baklava", sharpness=p[0], floor_frac=p[1])
        min_cap = int(p[2]) if len(p) > 2 else 16
    caps = alloc.allocate(ctx.scores, total, min_cap=min(min_cap, context), max_cap=context)
    # min, median, max capacity and how many heads hold <= 40 slots (less than sink + window + 4)
    caps_log[(method, fraction, context)] = (
        int(caps.min()),
        int(np.median(caps)),
        int(caps.max()),
        int((caps <= 40).sum()),
    )
    return caps, ctx.eviction


R.plan = plan
run = R.Runner(
    lm.model, lm.tokenizer, M.MethodContext(prof.scores, prof.eviction, {}), reconstruct_pool="auto"
)
todo = [R.Combo("v:" + v, b) for b in budgets for v in variants]
suite = build_suite(lm.tokenizer, tasks, lengths, limit)
res, rows, t = collections.defaultdict(list), [], time.time()
for L in lengths:
    batch = [s for s in suite if s.length == L]
    size = max(1, min(48, (131072 if L > 16384 else 393216) // L))
    for setting in ("query-aware", "query-agnostic"):
        for i in range(0, len(batch), size):
            for r in run.run(batch[i : i + size], setting, todo):
                res[(setting, r["method"], r["budget"])].append(r["score"])
                rows.append(
                    {k: r[k] for k in ("method", "budget", "task", "length", "score")} | {"setting": setting}
                )
        print(L, setting, round(time.time() - t), flush=True)
summary = {f"{k[0]}|{k[1]}|{k[2]}": float(np.mean(v)) for k, v in sorted(res.items())}
for k, v in summary.items():
    print(k, round(v, 3))
summary["caps"] = {str(k): v for k, v in caps_log.items()}
cells = collections.defaultdict(list)  # mean score per setting, variant, budget, length and task
for r in rows:
    cells[(r["setting"], r["method"], r["budget"], r["length"], r["task"])].append(r["score"])
keys = ("setting", "method", "budget", "length", "task")
summary["cells"] = [
    dict(zip(keys, k, strict=True), score=round(sum(v) / len(v), 4), n=len(v))
    for k, v in sorted(cells.items())
]
json.dump(summary, open(out, "w"), indent=0)
