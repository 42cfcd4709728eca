# Which tokens the heads keep, at one budget, on the quality suite (the sweep behind
# baklava/runtime/shared_selection.py); every variant compresses the same full-cache prefill. GPU:
#   python benchmarks/quality/selection_variants.py MODEL OUT.json LENGTHS BUDGET SAMPLES VARIANTS [SETTINGS]
# VARIANT "alloc/pool/mode": alloc "uniform" or "sharpness,floor_frac"; pool the max-pool width of
# the query-agnostic reconstruction scores; mode "-" (every head its own scores), "ring" (heads at
# or below the even share keep sink + the most recent tokens), "guide" (they keep by the
# importance-weighted mean of the favoured heads' normalised scores) or "guideall" (every head
# keeps by that mean: what shared selection does) or "blendW" (every head keeps by W times that mean
# plus 1 - W times its own normalised scores).
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
from baklava.runtime.reconstruction import pool_scores, score_by_reconstruction

model_name, out = sys.argv[1], sys.argv[2]
lengths = [int(x) for x in sys.argv[3].split(",")]
budget, limit, variants = float(sys.argv[4]), int(sys.argv[5]), sys.argv[6].split(";")
settings = sys.argv[7].split(",") if len(sys.argv) > 7 else ["query-agnostic", "query-aware"]
tasks = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe", "vt"]
dev = "cuda" if torch.cuda.is_available() else "cpu"
lm = load_model(model_name, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, progress=False)
lm.model.to(dev)
prof = pipeline.score(lm, pipeline.CalibrationSettings(), progress=False)
imp = prof.scores.kv_head  # [L, H]
run = R.Runner(lm.model, lm.tokenizer, M.MethodContext(prof.scores, prof.eviction, {}))


def caps_of(alloc, width):
    total = M.total_slots(budget, imp.shape, width)
    a = (
        make_allocator("uniform")
        if alloc == "uniform"
        else make_allocator(
            "baklava", sharpness=float(alloc.split(",")[0]), floor_frac=float(alloc.split(",")[1])
        )
    )
    return a.allocate(prof.scores, total, min_cap=16, max_cap=width), total / imp.size


def set_floor_scores(full, caps, share, mode):
    """Overwrite the scores of heads at or below the uniform share (positions align across heads)."""
    if mode == "-":
        return
    guide = None
    if mode.startswith(("guide", "blend")):  # importance-weighted mean of the rich heads' normalised scores
        guide, wsum = 0.0, 0.0
        for li, layer in enumerate(full.layers):
            for h, (off, cap) in enumerate(zip(layer.offsets, layer.capacities, strict=True)):
                if caps[li, h] <= share:
                    continue
                s = layer.scores[:, off : off + cap]
                guide = guide + float(imp[li, h]) * s / s.amax(1, keepdim=True).clamp_min(1e-9)
                wsum += float(imp[li, h])
        guide = guide / wsum
    for li, layer in enumerate(full.layers):
        for h, (off, cap) in enumerate(zip(layer.offsets, layer.capacities, strict=True)):
            if mode in ("guide", "ring") and caps[li, h] > share:
                continue
            if mode.startswith("blend"):
                w = float(mode[len("blend") :])
                s = layer.scores[:, off : off + cap]
                layer.scores[:, off : off + cap] = w * guide + (1 - w) * s / s.amax(
                    1, keepdim=True
                ).clamp_min(1e-9)
            elif mode == "ring":
                pos = layer.positions[:, off : off + cap].float()
                layer.scores[:, off : off + cap] = torch.where(pos >= 0, 1 + pos / 1e7, 0.0)
            else:
                layer.scores[:, off : off + cap] = guide


res, cells, t0 = collections.defaultdict(list), collections.defaultdict(list), time.time()
suite = build_suite(lm.tokenizer, tasks, lengths, limit)
with torch.inference_mode():
    for L in lengths:
        batch = [s for s in suite if s.length == L]
        size = max(1, min(48, (131072 if L > 16384 else 393216) // L))
        for setting in settings:
            for i in range(0, len(batch), size):
                samples = batch[i : i + size]
                steps = max(s.max_new_tokens for s in samples)
                ctx_ids, ctx_mask = R._pad_left([s.context_ids for s in samples], run.pad)
                q_ids, q_mask = R._pad_left([s.query_ids for s in samples], run.pad)
                ids = torch.cat([ctx_ids, q_ids], 1).to(run.device)
                mask = torch.cat([ctx_mask, q_mask], 1).to(run.device)
                width, split = ids.shape[1], ctx_ids.shape[1]
                full = run._full_cache(width + steps + 1)
                raw = None
                if setting == "query-aware":
                    first = run._forward(ids, mask, full)[:, -1]
                else:
                    run._forward(ids[:, :split], mask[:, :split], full)
                    raw = score_by_reconstruction(
                        run.model, full, ids[:, :split], mask[:, :split], run.instruction, pool_kernel=1
                    )
                saved = [layer.scores.clone() for layer in full.layers]
                for v in variants:
                    alloc, pool, floor = v.split("/")
                    for layer, s in zip(full.layers, saved, strict=True):
                        layer.scores.copy_(s)
                    if raw is not None:
                        pool_scores(full, raw, int(pool))
                    caps, share = caps_of(alloc, width)
                    set_floor_scores(full, caps, share, floor)
                    cache = full.compressed(caps, prof.eviction)
                    logits = (
                        first
                        if setting == "query-aware"
                        else run._forward(ids[:, split:], mask, cache)[:, -1]
                    )
                    outs = run._greedy(cache, logits, mask, steps)
                    for s, o in zip(samples, outs, strict=True):
                        sc = s.score(lm.tokenizer.decode(o[: s.max_new_tokens], skip_special_tokens=True))
                        res[(setting, v)].append(sc)
                        cells[(setting, v, L, s.task)].append(sc)
                    del cache
                del full
            print(L, setting, round(time.time() - t0), flush=True)
summary = {f"{k[0]}|{k[1]}": float(np.mean(x)) for k, x in sorted(res.items())}
for k, x in summary.items():
    print(k, round(x, 3))
json.dump(
    {
        "summary": summary,
        "budget": budget,
        "lengths": lengths,
        "samples": limit,
        "cells": [
            {
                "setting": k[0],
                "variant": k[1],
                "length": k[2],
                "task": k[3],
                "score": float(np.mean(x)),
                "n": len(x),
            }
            for k, x in sorted(cells.items())
        ],
        "seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
    },
    open(out, "w"),
    indent=1,
)
