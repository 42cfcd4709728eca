"""Soak run against a Triton server: valid, malformed and abandoned requests mixed, for a set time.

``clients`` threads send requests over loopback HTTP until ``duration_s`` has passed. Each
request is, by a seeded draw:

* **valid** (most): a streaming ``generate_stream`` request read to the end; it fails if it gets an
  error, no text, or no answer within ``timeout``;
* **malformed**: a body the server must refuse (missing or empty prompt, ``max_tokens`` out of
  range or of the wrong type, a prompt over the context, invalid JSON); it fails unless the
  server answers with an HTTP error or an error event;
* **abandoned**: a valid streaming request whose client hangs up after the first piece (the
  engine must cancel it or finish it without harm).

Afterwards the server must still be ready, and ``rows`` concurrent valid requests (the engine's
pool size) must all succeed: a request that leaked its row would starve them.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from baklava.bench.serve_load import prompts, stream_request


def malformed_bodies(context_tokens: int) -> list:
    """Request bodies a server with a ``context_tokens`` context must refuse (one word is at least
    one token, so the long prompt is over the context with or without a chat template)."""
    return [
        {"max_tokens": 4},
        {"text_input": "", "max_tokens": 4},
        {"text_input": "hi", "max_tokens": 0},
        {"text_input": "hi", "max_tokens": 10**6},
        {"text_input": "hi", "max_tokens": "many"},
        {"text_input": "hi", "max_tokens": 4, "temperature": -1.0},
        {"text_input": "word " * (context_tokens + 1), "max_tokens": 4},
        "{not json",
    ]


def _post(url: str, body, stream: bool, timeout: float):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    endpoint = "generate_stream" if stream else "generate"
    req = urllib.request.Request(
        f"{url}/v2/models/baklava/{endpoint}", data=data, headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def malformed_request(url: str, body, timeout: float) -> bool:
    """True when the server refuses ``body`` properly (an HTTP error, or an error in the reply)."""
    try:
        with _post(url, body, False, timeout) as resp:
            return "error" in json.loads(resp.read().decode())
    except urllib.error.HTTPError as e:
        return e.code >= 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def abandoned_request(url: str, prompt: str, timeout: float) -> bool:
    """Open a stream, read its first piece, hang up. True when the first piece arrived."""
    body = {"text_input": prompt, "max_tokens": 256, "stream": True}
    try:
        resp = _post(url, body, True, timeout)
    except (urllib.error.URLError, OSError):
        return False
    try:
        for raw in resp:
            if raw.decode("utf-8", "replace").startswith("data:"):
                return True
        return False
    except OSError:
        return False
    finally:
        resp.close()


def soak(
    url: str,
    *,
    duration_s: float = 600.0,
    clients: int = 8,
    max_tokens: int = 16,
    malformed_share: float = 0.2,
    abandoned_share: float = 0.1,
    rows: int = 8,
    context_tokens: int = 8192,
    timeout: float = 300.0,
    seed: int = 0,
) -> dict:
    """Run the soak (``context_tokens``: the served model's context, for a prompt over it);
    returns counts per kind, failures, and the after-checks."""
    malformed = malformed_bodies(context_tokens)
    counts: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    texts = prompts(64)
    deadline = time.monotonic() + duration_s

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            draw = rng.random()
            if draw < malformed_share:
                kind, ok = "malformed", malformed_request(url, rng.choice(malformed), timeout)
                why = "a malformed request was not refused"
            elif draw < malformed_share + abandoned_share:
                kind, ok = "abandoned", abandoned_request(url, rng.choice(texts), timeout)
                why = "an abandoned request got no first piece"
            else:
                r = stream_request(url, "baklava", rng.choice(texts), max_tokens, timeout)
                kind, ok, why = "valid", r.ok, f"valid request failed: {r.error}"
            with lock:
                counts[kind] += 1
                if not ok:
                    failures.append(why)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    soak_s = time.monotonic() - start
    with ThreadPoolExecutor(rows) as pool:  # every row at once: a row a request kept would starve one
        chosen = [texts[i % len(texts)] for i in range(rows)]
        after = list(pool.map(lambda p: stream_request(url, "baklava", p, max_tokens, timeout), chosen))
    return {
        "duration_s": round(soak_s, 1),
        "clients": clients,
        "requests": dict(counts),
        "failures": len(failures),
        "failure_reasons": sorted(Counter(failures).items())[:5],
        "after_soak_rows_ok": sum(r.ok for r in after),
        "after_soak_rows": rows,
    }
