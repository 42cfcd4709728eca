"""The engine on a background thread: other threads submit and cancel, callbacks get the events.

This is the shape of a serving backend (vLLM's Triton backend works the same way): a request
handler calls :meth:`EngineLoop.submit` and returns at once; the loop thread owns the
:class:`~baklava.runtime.engine.Engine`, steps it while there is work, checks each request's
``is_cancelled`` before every step, and hands every event to that request's callback. A failing
callback cancels its request; a failing step ends the requests in flight with an error, and the
loop keeps serving.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from baklava.runtime.engine import Engine, Event
from baklava.runtime.sampling import SamplingParams


@dataclass
class _Submission:
    prompt: object
    params: SamplingParams
    on_event: Callable[[Event], None]
    is_cancelled: Callable[[], bool] | None
    request_id: str
    context: object = None  # compressed into the request's row before the prompt (Engine.submit)


class EngineLoop:
    """Run ``engine`` on its own thread (``start`` / ``stop``, or as a context manager)."""

    def __init__(self, engine: Engine, *, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._live: dict[str, _Submission] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baklava-engine", daemon=True)
        self._ids = 0
        self._lock = threading.Lock()

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

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
        with self._lock:
            self._ids += 1
            rid = f"r{self._ids}"
        self._inbox.put(_Submission(prompt, params, on_event, is_cancelled, rid, context))
        return rid

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self.engine.has_work())
            self._poll_cancelled()
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
                events = self.engine.abort_all(f"internal error: {type(e).__name__}: {e}")
            for event in events:
                self._deliver(event)
        for event in self.engine.abort_all("server is shutting down"):
            self._deliver(event)

    def _take(self, block: bool) -> None:
        try:
            sub = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self.engine.submit(sub.prompt, sub.params, request_id=sub.request_id, context=sub.context)
                self._live[sub.request_id] = sub
            except Exception as e:  # noqa: BLE001 - reported to the request, never raised
                self._call(sub, Event(sub.request_id, finished=True, finish_reason="error", error=str(e)))
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _poll_cancelled(self) -> None:
        for rid, sub in list(self._live.items()):
            try:
                cancelled = sub.is_cancelled is not None and sub.is_cancelled()
            except Exception:  # noqa: BLE001 - a broken check counts as a disconnect
                cancelled = True
            if cancelled:
                self.engine.cancel(rid)

    def _deliver(self, event: Event) -> None:
        sub = self._live.get(event.request_id)
        if sub is None:
            return
        if event.finished:
            del self._live[event.request_id]
        if not self._call(sub, event) and not event.finished:
            self.engine.cancel(event.request_id)

    @staticmethod
    def _call(sub: _Submission, event: Event) -> bool:
        try:
            sub.on_event(event)
        except Exception:  # noqa: BLE001 - the client is gone: stop its request
            return False
        return True
