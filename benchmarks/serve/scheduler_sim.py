"""The engine's scheduler on paper: decode steps, rows decoded and rows run, with and without
moving decoding rows to the front (``Engine._compact``), for the engine benchmark's workload.

No model: each request is ``(prompt tokens, new tokens)`` drawn as ``serve_engine.workload``
draws them (seed 0); every step admits waiting requests to the lowest free rows, prefills whole
chunks up to the step's budget in arrival order, then decodes one token for every decoding row
over the smallest bucket (powers of two, then the pool) holding the highest decoding row::

    python benchmarks/serve/scheduler_sim.py --rows 237 --rows 466
"""

from __future__ import annotations

import heapq

import click
import numpy as np

from baklava.runtime.engine_step import buckets


def simulate(rows: int, compact: bool, n: int = 512, chunk: int = 8192, budget: int = 16384, seed: int = 0):
    """``(steps, mean rows decoded, mean rows run, compactions)`` of one drained workload."""
    gen = np.random.default_rng(seed)
    work = []
    for _ in range(n):
        length = int(gen.integers(1024, 4097))
        gen.integers(0, 1 << 20)  # the prompt's start in the source text (unused here)
        work.append((length, int(gen.integers(256, 513))))
    sizes = buckets(rows)
    waiting, free, active = list(range(n)), list(range(rows)), {}  # row -> [request, prefilled, decoded]
    steps = decoded = run = compactions = 0
    while waiting or active:
        while waiting and free:
            active[heapq.heappop(free)] = [waiting.pop(0), 0, 0]
        left = budget
        for row in sorted(active, key=lambda r: active[r][0]):
            if left <= 0:
                break
            req = active[row]
            length = work[req[0]][0]
            if req[1] < length:
                take = min(chunk, length - req[1])
                req[1], left = req[1] + take, left - take
                req[2] = int(req[1] == length)  # the prompt's last chunk samples the first token
        decoding = [r for r, q in active.items() if q[1] == work[q[0]][0] and q[2] >= 1]
        if not decoding:
            continue
        bucket = next(b for b in sizes if b >= len(decoding))
        if compact and max(decoding) >= bucket:
            busy = set(decoding)
            movers = sorted(r for r in decoding if r >= bucket)
            targets = [r for r in range(bucket) if r not in busy][: len(movers)]
            free_set = set(free)
            for src, dst in zip(movers, targets, strict=True):
                mine, theirs = active.pop(src), active.pop(dst, None)
                active[dst] = mine
                if theirs is None:
                    free_set.discard(dst)
                    free_set.add(src)
                else:
                    active[src] = theirs
            free = sorted(free_set)
            compactions += 1
            decoding = [r for r, q in active.items() if q[1] == work[q[0]][0] and q[2] >= 1]
        steps += 1
        decoded += len(decoding)
        run += next(b for b in sizes if b > max(decoding))
        for row in decoding:
            req = active[row]
            req[2] += 1
            if req[2] > work[req[0]][1]:
                del active[row]
                heapq.heappush(free, row)
    return steps, round(decoded / steps, 1), round(run / steps, 1), compactions


@click.command()
@click.option("--rows", multiple=True, type=int, default=(237, 466), show_default=True)
def main(rows) -> None:
    for r in rows:
        for compact in (False, True):
            steps, decoded, ran, moves = simulate(r, compact)
            print(f"{r} rows, compaction {'on ' if compact else 'off'}: {steps} steps, "
                  f"{decoded} decoded / {ran} run a step, {moves} compactions")  # fmt: skip


if __name__ == "__main__":
    main()
