"""Load run against a Triton server: N requests from C concurrent clients over loopback HTTP.

Each client streams its answer (``generate_stream``, server-sent events), so time to first token
and total latency are both measured. Requests are deterministic (a fixed prompt list, greedy).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

TOPICS = [
    "the water cycle",
    "how vaccines work",
    "the history of the printing press",
    "photosynthesis",
    "why the sky is blue",
    "how a bicycle stays upright",
    "the rules of chess",
    "black holes",
    "how bread rises",
    "the causes of tides",
    "what a compiler does",
    "how bees make honey",
    "the French revolution",
    "how solar panels work",
    "plate tectonics",
    "the immune system",
]


def prompts(n: int) -> list[str]:
    """``n`` deterministic prompts cycling over topics and phrasings."""
    forms = ["Explain {} in two sentences.", "Give one surprising fact about {}.", "Describe {} to a child."]
    return [forms[(i // len(TOPICS)) % len(forms)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def long_prompts(tokenizer, n: int, lengths: tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` prompts of ``lengths[0]``-``lengths[1]`` tokens (uniform) cut from the standard
    library's documentation, as text: the engine benchmark's workload, sent over HTTP (the server
    tokenizes them again, with its chat template)."""
    from baklava.bench.serve_engine import prose_tokens, workload

    work = workload(n, lengths, (1, 1), prose_tokens(tokenizer), seed)
    return [tokenizer.decode(w.prompt) for w in work]


@dataclass
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None
    tokens: int
    error: str | None = None
    gaps_s: list[float] = field(default_factory=list)  # inter-token: a piece's gap split over its tokens


def stream_request(url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> RequestResult:
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "stream": True}).encode()
    req = urllib.request.Request(
        f"{url}/v2/models/{model}/generate_stream", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    ttft, tokens, last, gaps = None, 0, None, []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return RequestResult(False, time.perf_counter() - start, ttft, tokens, event["error"])
                # a piece holds num_tokens tokens (1 from a server that does not say): after a gap,
                # each counts gap / n towards inter-token latency
                n = int(event.get("num_tokens", 1 if event.get("text_output") else 0))
                if n:
                    now = time.perf_counter()
                    tokens += n
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps += [(now - last) / n] * n
                    last = now
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        return RequestResult(False, time.perf_counter() - start, ttft, tokens, f"{type(e).__name__}: {e}")
    return RequestResult(
        tokens > 0, time.perf_counter() - start, ttft, tokens, None if tokens else "no tokens", gaps
    )


def gpu_memory_used(metrics: str) -> int | None:
    """Bytes of GPU memory in use on every GPU together, from Triton's Prometheus text (its
    ``nv_gpu_memory_used_bytes`` gauges); None without one (a server on the CPU only)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("nv_gpu_memory_used_bytes{")
    ]
    return int(sum(values)) if values else None


class PeakGpuMemory:
    """Poll a Triton metrics URL in the background; ``peak`` is the most GPU memory seen in use
    (bytes, every GPU together; None if the server reports none)."""

    def __init__(self, url: str | None, every_s: float = 0.5):
        self.url, self.every_s, self.peak = url, every_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    used = gpu_memory_used(r.read().decode(errors="replace"))
                if used is not None:
                    self.peak = max(self.peak or 0, used)
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> PeakGpuMemory:
        if self.url:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_run(
    url: str,
    *,
    requests: int = 200,
    concurrency: int = 16,
    max_tokens: int = 16,
    model: str = "baklava",
    timeout: float = 600.0,
    progress: bool = True,
    texts: list[str] | None = None,
    metrics_url: str | None = None,
) -> dict:
    """Send ``requests`` streaming requests from ``concurrency`` threads; return the summary.
    ``texts``: the prompts (``requests`` of them, cycled), instead of the short built-in ones;
    ``metrics_url``: the server's Prometheus endpoint, polled for its peak GPU memory."""
    bar = tqdm(total=requests, desc="load run", unit="req", disable=not progress)
    lock = threading.Lock()

    def one(prompt: str) -> RequestResult:
        result = stream_request(url, model, prompt, max_tokens, timeout)
        with lock:
            bar.update()
        return result

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool, PeakGpuMemory(metrics_url) as memory:
        chosen = prompts(requests) if texts is None else [texts[i % len(texts)] for i in range(requests)]
        results = list(pool.map(one, chosen))
    wall = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "failures": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": round(wall, 2),
        "latency_p50_s": round(_pct(latencies, 0.5), 3),
        "latency_p99_s": round(_pct(latencies, 0.99), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "ttft_p50_s": round(_pct(ttfts, 0.5), 3),
        "ttft_p99_s": round(_pct(ttfts, 0.99), 3),
        "itl_p50_ms": round(1000 * _pct(gaps, 0.5), 2),
        "itl_p99_ms": round(1000 * _pct(gaps, 0.99), 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "peak_gpu_memory_gib": None if memory.peak is None else round(memory.peak / 2**30, 2),
        "results": [{k: v for k, v in asdict(r).items() if k != "gaps_s"} for r in results],
    }


def serve_markdown(runs: list[dict]) -> str:
    """A table of load runs (one per served PATH), tokens/s against the first; the last column is
    the served engine's own account of its time (``engine_seconds``: from the server's log)."""
    base = runs[0]["tokens_per_s"] or float("nan")
    lines = [
        "| path | tokens/s | vs first | requests/s | TTFT p50 / p99 s | ITL p50 / p99 ms | peak GPU GiB | failed "
        "| engine prefill s (tokens/s) / decode s / idle s / longest step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        spent = r.get("engine_seconds")
        phases = (
            f"{spent['prefill_s']} ({spent['prefill_tokens'] / max(spent['prefill_s'], 1e-9):,.0f}) / "
            f"{spent['decode_s']} / {spent['idle_s']} / {spent['longest_step_s']}"
            if spent
            else "-"
        )
        lines.append(
            f"| {r['path']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x | {r['requests_per_s']} "
            f"| {r['ttft_p50_s']} / {r['ttft_p99_s']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} "
            f"| {r['peak_gpu_memory_gib'] if r['peak_gpu_memory_gib'] is not None else '-'} | {r['failures']} "
            f"| {phases} |"
        )
    return "\n".join(lines)
