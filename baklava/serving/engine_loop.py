"""The engine on a background thread: other threads submit, callbacks get the events.

This is the shape of a serving backend (vLLM's Triton backend works the same way): a request
handler calls :meth:`EngineLoop.submit` and returns at once. Two threads do the rest:

* the **engine thread** owns the :class:`~baklava.runtime.engine.Engine` and steps it while there
  is work; it never calls into a client. Its events go to an outbox that keeps **one pending event
  per request**: a piece not yet delivered absorbs the next ones (their text and tokens joined);
* the **delivery thread** empties the outbox into each request's callback, and every
  ``cancel_poll_s`` asks each live request's ``is_cancelled``; it spends at most
  ``delivery_share`` of the time doing so (after a round of T seconds it rests T x (1 / share - 1)).

Callbacks and ``is_cancelled`` are where a server talks to its clients, and that costs: in
Triton's Python backend each is an IPC round trip to the server process (measured on the 2-core
dev CPU: ~85 us a ``send``, ~40 us an ``is_cancelled``). Made on the engine thread (one send per
token per row, one check per live request per step, and the prompts tokenized there too), they
held an H200 serving 42 rows to an inter-token latency of 24 ms against a 4-6 ms step; moved off
it, the same server gave 2.2x the tokens/s (BENCHMARKS.md). On their own thread they overlap the
engine's GPU work, and when delivery falls behind, a request's pieces merge instead of queueing,
so the engine never waits for its clients.

A failing callback or a cancelled request stops its request at the engine's next step; a failing
step ends the requests in flight with an error, and the loop keeps serving. With ``on_stats``,
every ``stats_every_s`` of activity the engine thread reports where its time went
(:func:`format_stats`; a served instance prints it to the server's log).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from baklava.runtime.allocator_stats import allocator_counts, counts_since
from baklava.runtime.engine import Engine, Event
from baklava.runtime.sampling import SamplingParams


@dataclass
class _Submission:
    prompt: object
    params: SamplingParams
    on_event: Callable[[Event], None]
    is_cancelled: Callable[[], bool] | None
    request_id: str
    seq: int  # submission order (the inbox's order): tells "not taken yet" from "already finished"
    context: object = None  # compressed into the request's row before the prompt (Engine.submit)


def format_stats(stats: dict) -> str:
    """One log line of an ``on_stats`` report."""
    return (
        f"baklava engine, last {stats['window_s']:.1f} s: {stats['steps']} steps in {stats['step_s']:.1f} s "
        f"(prefill {stats['prefill_s']:.1f}, decode {stats['decode_s']:.1f}), idle {stats['idle_s']:.1f} s; "
        f"{stats['taken']} requests taken, {stats['finished']} finished, {stats['delivered']} deliveries; "
        f"{stats['prefill_tokens']} tokens prefilled, longest step {stats['longest_step_s']:.3f} s; "
        f"now {stats['running']}/{stats['rows']} rows busy, {stats['waiting']} waiting"
        + _format_allocator(stats.get("allocator"))
    )


def _format_allocator(counts: dict | None) -> str:
    if not counts:
        return ""
    return (
        f"; CUDA allocator: {counts['segments_allocated']} segments allocated, "
        f"{counts['segments_freed']} freed, {counts['alloc_retries']} retries"
    )


_ALLOCATOR_LINE = re.compile(r"CUDA allocator: (\d+) segments allocated, (\d+) freed, (\d+) retries")


_STATS_LINE = re.compile(
    r"baklava engine, last ([\d.]+) s: (\d+) steps in ([\d.]+) s \(prefill ([\d.]+), decode ([\d.]+)\), "
    r"idle ([\d.]+) s; (\d+) requests taken, (\d+) finished, \d+ deliveries; "
    r"(\d+) tokens prefilled, longest step ([\d.]+) s"
)
_SUMMED = (
    "window_s",
    "steps",
    "step_s",
    "prefill_s",
    "decode_s",
    "idle_s",
    "taken",
    "finished",
    "prefill_tokens",
)


def engine_seconds(log_text: str) -> dict | None:
    """The engine's time summed over the :func:`format_stats` lines in a server log: ``window_s``
    (the time the reports cover), ``steps``, ``step_s``, ``prefill_s``, ``decode_s``, ``idle_s``,
    ``taken``, ``finished``, ``prefill_tokens``, the longest step of any (``longest_step_s``), and
    on CUDA the caching allocator's trips to the driver (``allocator``); None without a report."""
    found = [m.groups() for m in _STATS_LINE.finditer(log_text)]
    if not found:
        return None
    out = {}
    for i, key in enumerate(_SUMMED):
        total = sum(float(g[i]) for g in found)
        out[key] = int(total) if key in ("steps", "taken", "finished", "prefill_tokens") else round(total, 1)
    out["longest_step_s"] = max(float(g[-1]) for g in found)
    allocator = [m.groups() for m in _ALLOCATOR_LINE.finditer(log_text)]
    if allocator:  # a CUDA instance's
        keys = ("segments_allocated", "segments_freed", "alloc_retries")
        out["allocator"] = {k: sum(int(g[i]) for g in allocator) for i, k in enumerate(keys)}
    return out


def format_ready(engine: Engine) -> str:
    """The log line a served instance prints once its engine is built and warm: its pool."""
    pool = engine.pool
    return (
        f"baklava engine ready: {pool.rows} rows of {int(pool.cache.capacities.sum())} slots, "
        f"{pool.kv_bytes() / 2**30:.2f} GiB of KV on {pool.device}"
    )


_READY_LINE = re.compile(r"baklava engine ready: (\d+) rows")


def served_rows(log_text: str) -> int | None:
    """The pool rows of every instance that printed :func:`format_ready` in a server log (their
    sum: each instance has its own pool); None when none did."""
    found = [int(m.group(1)) for m in _READY_LINE.finditer(log_text)]
    return sum(found) if found else None


def merge(pending: Event, later: Event) -> Event:
    """One event for two of the same request, in order: the text and tokens joined, the end (and
    time) of the later one."""
    return replace(later, text=pending.text + later.text, token_ids=[*pending.token_ids, *later.token_ids])


class EngineLoop:
    """Run ``engine`` on its own thread, deliver its events from another (``start`` / ``stop``, or
    as a context manager)."""

    def __init__(
        self,
        engine: Engine,
        *,
        idle_wait_s: float = 0.05,
        cancel_poll_s: float = 0.2,
        delivery_share: float = 0.25,
        stats_every_s: float = 10.0,
        on_stats: Callable[[dict], None] | None = None,
    ):
        if not 0 < delivery_share <= 1:
            raise ValueError(f"delivery_share must be in (0, 1], got {delivery_share}")
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.cancel_poll_s = cancel_poll_s
        self.delivery_share = delivery_share
        self.stats_every_s, self.on_stats = stats_every_s, on_stats
        self._delivered = 0  # callbacks made (the delivery thread's count)
        self._window = self._new_window()
        self._inbox: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._gone: queue.SimpleQueue[_Submission] = queue.SimpleQueue()  # to cancel (delivery -> engine)
        self._live: dict[str, _Submission] = {}  # submitted, final event not yet delivered
        self._lock = threading.Lock()  # _live and the submission counter
        self._outbox: dict[str, Event] = {}  # one pending event per request (engine -> delivery)
        self._outbox_cv = threading.Condition()
        self._ids = 0
        self._taken = 0  # highest ``seq`` the engine thread has taken from the inbox
        self._cancel_before_taken: set[int] = set()
        self._stop = threading.Event()
        self._engine_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baklava-engine", daemon=True)
        self._delivery = threading.Thread(target=self._deliver_loop, name="baklava-delivery", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        self._delivery.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every request in flight ("server is shutting down"), deliver, and stop both threads."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._engine_done.set()
        with self._outbox_cv:
            self._outbox_cv.notify()
        if self._delivery.is_alive():
            self._delivery.join(timeout)
        if not self._thread.is_alive():
            self._report(final=True)  # the last window, however short

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(
        self,
        prompt,
        params: SamplingParams,
        on_event: Callable[[Event], None],
        is_cancelled: Callable[[], bool] | None = None,
        *,
        context=None,
    ) -> str:
        """Queue a request (``context``: see :meth:`Engine.submit`); returns its id at once. Errors
        (a prompt over the context, say) arrive as a finished event with ``error`` set."""
        with self._lock:  # one lock for the id, _live and the inbox: what _live shows is queued
            self._ids += 1
            sub = _Submission(prompt, params, on_event, is_cancelled, f"r{self._ids}", self._ids, context)
            self._live[sub.request_id] = sub
            self._inbox.put(sub)
        return sub.request_id

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            idle = not self.engine.has_work()
            start = time.monotonic()
            self._take(block=idle)
            if idle:
                self._window["idle_s"] += time.monotonic() - start
            self._cancel_gone()
            if self.engine.has_work():
                start = time.monotonic()
                try:
                    events = self.engine.step()
                except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
                    events = self.engine.abort_all(f"internal error: {type(e).__name__}: {e}")
                took = time.monotonic() - start
                self._window["steps"] += 1
                self._window["step_s"] += took
                self._window["longest_step_s"] = max(self._window["longest_step_s"], took)
                self._window["finished"] += sum(e.finished for e in events)
                self._post(events)
            self._report()
        self._post(self.engine.abort_all("server is shutting down"))
        while True:  # requests still in the inbox are answered too
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._post(
                [Event(sub.request_id, finished=True, finish_reason="error", error="server is shutting down")]
            )

    def _new_window(self) -> dict:
        """The engine thread's counters since the last report."""
        return {
            "start": time.monotonic(),
            "phases": dict(self.engine.phase_seconds),
            "prefilled": self.engine.prefill_tokens,
            "allocator": allocator_counts(self.engine.pool.device),
            "delivered": self._delivered,
            "steps": 0,
            "step_s": 0.0,
            "longest_step_s": 0.0,
            "idle_s": 0.0,
            "taken": 0,
            "finished": 0,
        }

    def _report(self, final: bool = False) -> None:
        """Every ``stats_every_s`` with steps in it (and at the end), ``on_stats`` gets the
        window's figures."""
        w, now = self._window, time.monotonic()
        if self.on_stats is None or (now - w["start"] < self.stats_every_s and not final):
            return
        if w["steps"]:
            phases = self.engine.phase_seconds
            stats = {
                "window_s": now - w["start"],
                "steps": w["steps"],
                "step_s": w["step_s"],
                "prefill_s": phases.get("prefill", 0.0) - w["phases"].get("prefill", 0.0),
                "decode_s": phases.get("decode", 0.0) - w["phases"].get("decode", 0.0),
                "idle_s": w["idle_s"],
                "prefill_tokens": self.engine.prefill_tokens - w["prefilled"],
                "longest_step_s": w["longest_step_s"],
                "taken": w["taken"],
                "finished": w["finished"],
                "delivered": self._delivered - w["delivered"],
                "running": self.engine.running,
                "rows": self.engine.pool.rows,
                "waiting": self.engine.waiting,
                "allocator": counts_since(w["allocator"], allocator_counts(self.engine.pool.device)),
            }
            try:
                self.on_stats(stats)
            except Exception:  # noqa: BLE001 - a report must never stop the engine
                pass
        self._window = self._new_window()

    def _take(self, block: bool) -> None:
        try:
            sub = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._taken = sub.seq
            self._window["taken"] += 1
            if sub.seq in self._cancel_before_taken:
                self._cancel_before_taken.discard(sub.seq)
                self._post(
                    [
                        Event(
                            sub.request_id, finished=True, finish_reason="cancelled", time=time.perf_counter()
                        )
                    ]
                )
            else:
                try:
                    self.engine.submit(sub.prompt, sub.params, request_id=sub.request_id, context=sub.context)
                except Exception as e:  # noqa: BLE001 - reported to the request, never raised
                    self._post([Event(sub.request_id, finished=True, finish_reason="error", error=str(e))])
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _cancel_gone(self) -> None:
        while True:
            try:
                sub = self._gone.get_nowait()
            except queue.Empty:
                return
            if sub.seq > self._taken:  # still in the inbox: refused when taken
                self._cancel_before_taken.add(sub.seq)
            else:  # a request the engine no longer knows has finished already
                self.engine.cancel(sub.request_id)

    def _post(self, events: list[Event]) -> None:
        if not events:
            return
        with self._outbox_cv:
            for event in events:
                pending = self._outbox.get(event.request_id)
                self._outbox[event.request_id] = event if pending is None else merge(pending, event)
            self._outbox_cv.notify()

    # ------------------------------------------------------------------ the delivery thread
    def _deliver_loop(self) -> None:
        next_poll = time.monotonic() + self.cancel_poll_s
        rest = 0.0
        while True:
            if rest > 0 and not self._engine_done.is_set():
                self._engine_done.wait(rest)  # the engine's share of the GIL (a stop ends the rest)
            with self._outbox_cv:
                if not self._outbox:
                    if self._engine_done.is_set() and not self._thread.is_alive():
                        return  # stopped, and the engine's last events are delivered
                    self._outbox_cv.wait(max(0.0, next_poll - time.monotonic()))
                batch, self._outbox = self._outbox, {}
            start = time.monotonic()
            for event in batch.values():
                self._deliver(event)
            if time.monotonic() >= next_poll:
                self._poll_cancelled()
                next_poll = time.monotonic() + self.cancel_poll_s
            # A busy delivery thread takes the GIL from the engine thread at every torch call's
            # return (measured in Triton's stub on the dev CPU: sending flat out halves the engine
            # thread's torch ops a second). So it sends for at most ``delivery_share`` of the time:
            # a round that took T waits T x (1 / share - 1) before the next, while pieces merge.
            rest = (time.monotonic() - start) * (1 / self.delivery_share - 1)

    def _deliver(self, event: Event) -> None:
        with self._lock:
            sub = self._live.get(event.request_id)
            if sub is not None and event.finished:
                del self._live[event.request_id]
        if sub is None:
            return
        self._delivered += 1
        try:
            sub.on_event(event)
        except Exception:  # noqa: BLE001 - the client is gone: stop its request
            if not event.finished:
                self._gone.put(sub)

    def _poll_cancelled(self) -> None:
        with self._lock:
            live = [s for s in self._live.values() if s.is_cancelled is not None]
        for sub in live:
            try:
                cancelled = sub.is_cancelled()
            except Exception:  # noqa: BLE001 - a broken check counts as a disconnect
                cancelled = True
            if cancelled:
                self._gone.put(sub)
