"""A continuous-batching engine over one budgeted slot pool: fewer KV bytes -> more sequences at once.

Every :meth:`Engine.step` is one iteration of the scheduler and the model::

    cancelled requests ─▶ finish, free their rows
    waiting requests   ─▶ free rows (lowest first), each row emptied (SlotPool.reset_row)
    prefilling rows    ─▶ the next chunk of each prompt into its own row, up to
                          ``max_prefill_tokens`` a step; the prompts it finished sample their
                          first tokens once all are queued (one host sync a step)
    decoding rows      ─▶ moved down to the smallest bucket that holds them if they lie above it
                          (exchanged with rows that do not decode: _compact), then one decode step
                          for rows 0 .. n-1 (DecodeStep: a CUDA graph per bucket), only decoding
                          rows written; sample every row; stream text pieces
    EOS / max_tokens   ─▶ finish, free the row

Requests enter through :meth:`Engine.submit` (token ids or a prompt) and come back as
:class:`Event` s: one per new text piece, the last one with ``finished`` set. A request's tokens
do not depend on what else runs: its prefill sees only its row, the decode step writes only
decoding rows, and the decode kernels tile every step as the whole pool (tested token for token
against the request alone).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from baklava.errors import BaklavaError
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.engine_step import DecodeStep
from baklava.runtime.sampling import SamplingParams, TextPieces, next_token
from baklava.runtime.slot_pool import SlotPool, pool_rows

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


@dataclass
class Event:
    """What one step produced for one request: a text piece and/or the end of the request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # tokens sampled this step (EOS too, not its text)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled", "error"
    error: str | None = None
    time: float = 0.0  # perf_counter when the step produced it


@dataclass
class _Request:
    id: str
    prompt: torch.Tensor  # [S] token ids
    params: SamplingParams
    pieces: TextPieces
    generator: torch.Generator | None
    arrival: float
    state: str = WAITING
    row: int | None = None
    prefilled: int = 0
    view: object = None  # the row's cache view while prefilling
    context: torch.Tensor | None = None  # [C] ids compressed into the row before the prompt
    output: list[int] = field(default_factory=list)
    first_token_time: float | None = None


class Engine:
    """Serve many requests at once from ``pool``'s rows with ``model``.

    Parameters
    ----------
    model, tokenizer
        A transformers decoder (switched to the ``baklava`` attention here) and its tokenizer
        (None: token ids in, token ids out, empty text pieces).
    pool : SlotPool
        The cache rows (see :meth:`from_capacities` to size one from memory).
    prefill_chunk : int
        Tokens of one prompt per prefill call (bounds attention to capacity + one chunk).
    max_prefill_tokens : int
        Prompt tokens prefilled per step, over all requests, in whole chunks (bounds the pause of
        decoding rows; one chunk always runs).
    chat : bool
        Apply the chat template to text prompts.
    fused, cuda_graphs : bool
        On CUDA, the fused one-token layer forward and one CUDA graph per step bucket.
    """

    def __init__(
        self,
        model,
        tokenizer,
        pool: SlotPool,
        *,
        prefill_chunk: int = 8192,
        max_prefill_tokens: int = 16384,
        chat: bool = True,
        fused: bool = True,
        cuda_graphs: bool = True,
    ):
        from baklava.runtime.attention import enable

        if prefill_chunk < 1 or max_prefill_tokens < 1:
            raise BaklavaError("prefill_chunk and max_prefill_tokens must be >= 1")
        enable(model)
        if fused and pool.device.type == "cuda":
            from baklava.runtime import fused_decode

            fused_decode.fuse(model)
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.prefill_chunk, self.max_prefill_tokens, self.chat = prefill_chunk, max_prefill_tokens, chat
        self.context = model.config.max_position_embeddings
        self.eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        self.step_fn = DecodeStep(model, pool, cuda_graphs=cuda_graphs)
        self.profile = None  # set by from_profile: what compressing a request's context needs
        self._free = list(range(pool.rows))  # a heap: lowest free row first keeps steps small
        self._waiting: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # row -> request
        self._by_id: dict[str, _Request] = {}
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self.reset_counters()

    @classmethod
    def from_capacities(
        cls,
        model,
        tokenizer,
        capacities,
        eviction=None,
        *,
        kv_memory: int | None = None,
        max_batch: int | None = None,
        kv_format=None,
        **kwargs,
    ) -> Engine:
        """An engine whose pool holds ``max_batch`` rows, or as many as fit in ``kv_memory`` bytes
        (exactly ``sum(capacities)`` slots a row), or the smaller of the two when both are given.

        ``kv_format``: how slots store tokens (:mod:`baklava.kv_format`); rows are sized by its real
        bytes (payload plus scales), so int8 fits about twice the rows of bf16 in ``kv_memory``."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        rows = pool_rows(kv_memory, max_batch, capacities, head_dim, dtype, kv_format)
        pool = SlotPool.for_model(model, capacities, eviction, rows, kv_format)
        return cls(model, tokenizer, pool, **kwargs)

    @classmethod
    def from_profile(cls, model, tokenizer, profile, **kwargs) -> Engine:
        """:meth:`from_capacities` with a budget profile's capacities, eviction and KV format, after
        checking the profile was made for ``model``; its requests may carry a context."""
        caps = profile.capacities_for(model.config)
        engine = cls.from_capacities(
            model, tokenizer, caps, profile.eviction, kv_format=profile.kv_format, **kwargs
        )
        engine.profile = profile  # what compressing a request's context reads (submit's context=)
        return engine

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str) -> torch.Tensor:
        """Token ids ``[S]`` of a text prompt (with the chat template when ``chat``)."""
        from baklava.runtime.generate import encode

        return encode(self.tokenizer, [prompt], chat=self.chat, max_context=self.context)["input_ids"][0]

    def submit(
        self,
        prompt: str | list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        request_id=None,
        *,
        context: str | list[int] | torch.Tensor | None = None,
    ) -> str:
        """Queue a request (text, or token ids); returns its id. Raises :class:`BaklavaError`
        for an empty prompt, a duplicate id, or context + prompt + ``max_tokens`` over the context.

        ``context``: tokens read before the prompt (a document, a chat history; text is tokenized
        as is, no template) and compressed the way the quality benchmark measures a context read
        before its question (:func:`~baklava.runtime.context_compression.compress_context`:
        one full prefill, reconstruction scores, shared selection below budget 0.2) instead of
        chunk by chunk as it arrives; the prompt then goes into the compressed row. Needs an
        engine made by :meth:`from_profile`; the full prefill holds the context's whole KV once,
        outside the pool, and pauses the other rows while it runs.
        """
        params = params or SamplingParams()
        ids = self.encode(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt, dtype=torch.long)
        ids = ids.reshape(-1).cpu()
        if self.pool.device.type == "cuda":  # pinned: its chunks go to the GPU without a sync
            ids = ids.pin_memory()
        if ids.numel() == 0:
            raise BaklavaError("prompt is empty")
        ctx = None
        if context is not None:
            if self.profile is None:
                raise BaklavaError(
                    "a request's context is compressed by its profile: build the engine with from_profile"
                )
            if isinstance(context, str):
                context = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            ctx = torch.as_tensor(context, dtype=torch.long).reshape(-1).cpu()
            if ctx.numel() == 0:
                raise BaklavaError("context is empty")
        total = ids.numel() + (0 if ctx is None else ctx.numel())
        if total + params.max_tokens > self.context:
            raise BaklavaError(
                f"prompt ({total} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {self.context}"
            )
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._by_id:
            raise BaklavaError(f"request id {rid!r} is already in flight")
        req = _Request(rid, ids, params, TextPieces(self.tokenizer), params.generator(), time.perf_counter())
        req.context = ctx
        self._by_id[rid] = req
        self._waiting.append(req)
        return rid

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (its last event has ``finish_reason="cancelled"``)."""
        if str(request_id) in self._by_id:
            self._cancelled.add(str(request_id))

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def running(self) -> int:
        """Requests holding a row (prefilling or decoding)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests queued for a row."""
        return len(self._waiting)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One scheduler iteration (see the module docstring); returns the events it produced."""
        events: list[Event] = []
        for rid in list(self._cancelled):
            self._finish(self._by_id[rid], "cancelled", events)
        self._cancelled.clear()
        self._admit()
        start = time.perf_counter()
        self._prefill(events)
        middle = time.perf_counter()
        self._decode(events)
        self.phase_seconds["prefill"] += middle - start
        self.phase_seconds["decode"] += time.perf_counter() - middle
        return events

    def _admit(self) -> None:
        while self._waiting and self._free:
            req = self._waiting.popleft()
            req.row = heapq.heappop(self._free)
            self.pool.reset_row(req.row)
            req.view = self.pool.row_view(req.row)
            req.state = PREFILLING
            self._active[req.row] = req

    def _prefill(self, events: list[Event]) -> None:
        budget = self.max_prefill_tokens
        done: list[tuple[_Request, torch.Tensor]] = []  # prompts prefilled this step, their last logits
        for req in sorted(self._active.values(), key=lambda r: r.arrival):
            if budget <= 0:
                break
            if req.state != PREFILLING:
                continue
            if req.context is not None:  # compressed into the row first, then the prompt
                budget -= self._load_context(req)
                continue
            # whole chunks only: where a prompt is cut decides what its cache keeps, and that must
            # not depend on the other requests (the step's budget may be overrun by one chunk)
            n = min(self.prefill_chunk, req.prompt.numel() - req.prefilled)
            chunk = req.prompt[req.prefilled : req.prefilled + n].to(self.pool.device, non_blocking=True)
            logits = self.model(
                input_ids=chunk[None], **forward_cache(self.model, req.view), logits_to_keep=1
            ).logits[0, -1]
            req.prefilled += n
            budget -= n
            self.prefill_tokens += n
            if req.prefilled == req.prompt.numel():
                req.view, req.state = None, DECODING
                done.append((req, logits))
        if done:  # one host sync for the step's prompts: the GPU runs one while the next is queued
            rows = torch.stack([logits for _, logits in done]).float().cpu()
            for (req, _), row in zip(done, rows, strict=True):
                self._emit(req, next_token(row, req.params, req.generator), events)

    def _load_context(self, req: _Request) -> int:
        """Compress ``req``'s context into its row (its view then continues after it); returns
        the context's tokens (counted against the step's prefill budget)."""
        from baklava.runtime.context_compression import compress_context

        cache = compress_context(self.model, self.tokenizer, self.profile, req.context.to(self.pool.device))
        self.pool.load_row(req.row, cache)
        n, req.context = req.context.numel(), None
        self.prefill_tokens += n
        for layer in req.view.layers:
            layer.seen = n  # the prompt's positions continue after the context
        return n

    def _decode(self, events: list[Event]) -> None:
        decoding = [r for r in self._active.values() if r.state == DECODING]
        if not decoding:
            return
        # host work here is paid by every row of every step (at 140 rows, 1 us a row is 1% of a
        # 14 ms step): one tensor per step, no per-row tensor indexing
        n = self.step_fn.bucket(len(decoding))
        if max(r.row for r in decoding) >= n:
            self._compact(decoding, n)
        rows = torch.tensor([r.row for r in decoding])
        fed = torch.zeros(n, dtype=torch.long)
        fed[rows] = torch.tensor([r.output[-1] for r in decoding])
        mask = torch.zeros(self.pool.rows, dtype=torch.bool)
        mask[rows] = True
        self.pool.step_rows.copy_(mask, non_blocking=True)
        logits = self.step_fn(n, fed)  # [n, V]
        self.decode_counts["steps"] += 1
        self.decode_counts["rows_decoded"] += len(decoding)
        self.decode_counts["rows_run"] += n
        greedy = logits.argmax(-1).tolist()  # every row's (idle rows' too: one small sync)
        for r in decoding:
            token = (
                greedy[r.row]
                if r.params.greedy
                else next_token(logits[r.row].float().cpu(), r.params, r.generator)
            )
            self._emit(r, token, events)

    def _compact(self, decoding: list[_Request], n: int) -> None:
        """Move the decoding rows at ``n`` or above into rows below ``n`` that do not decode (free,
        or prefilling: those move up in exchange), so the step runs the smallest bucket holding
        its rows. Rows are freed wherever requests end, and new requests take the lowest free
        rows, so decoding rows scatter over the pool as it drains: without this, a served run
        at 466 rows ran 449 rows a step for 243 decoded. One exchange of every state tensor of
        every layer, a few times a run (BENCHMARKS.md); a row's tokens do not change (the kernels
        tile every row alike)."""
        movers = sorted((r for r in decoding if r.row >= n), key=lambda r: r.row)
        busy = {r.row for r in decoding}
        targets = [row for row in range(n) if row not in busy][: len(movers)]
        sources = [r.row for r in movers]
        self.pool.swap_rows(sources, targets)
        free = set(self._free)
        for req, row in zip(movers, targets, strict=True):
            other = self._active.pop(row, None)  # a prefilling request, or None: a free row
            old = req.row
            self._active[row], req.row = req, row
            if other is None:
                free.discard(row)
                free.add(old)
                del self._active[old]
            else:
                self._active[old], other.row = other, old
                other.view = self.pool.moved_view(other.view, old)
        self._free = sorted(free)  # a sorted list is a heap
        self.decode_counts["compactions"] += 1
        self.decode_counts["rows_moved"] += len(movers)

    def _emit(self, req: _Request, token: int, events: list[Event]) -> None:
        """Record a sampled token: an event with its text piece, and the end of the request if due."""
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
        if token == self.eos and not req.params.ignore_eos:
            self._finish(req, "stop", events, [token])
            return
        req.output.append(token)
        piece = req.pieces.push(token)
        if len(req.output) >= req.params.max_tokens:
            events.append(Event(req.id, piece + req.pieces.flush(), [token], True, "length", time=now))
            self._release(req)
        else:
            events.append(Event(req.id, piece, [token], time=now))

    def _finish(
        self, req: _Request, reason: str, events: list[Event], tokens: list[int] | None = None
    ) -> None:
        events.append(Event(req.id, req.pieces.flush(), tokens or [], True, reason, time=time.perf_counter()))
        self._release(req)

    def _release(self, req: _Request) -> None:
        if req.state == WAITING:
            self._waiting.remove(req)
        elif req.row is not None:
            self.pool.step_rows[req.row] = False
            del self._active[req.row]
            heapq.heappush(self._free, req.row)
        req.state, req.row, req.view = FINISHED, None, None
        self._by_id.pop(req.id, None)

    def abort_all(self, reason: str) -> list[Event]:
        """Finish every request with an error (after a failed step); the pool serves on."""
        events = []
        for req in [*self._waiting, *self._active.values()]:
            events.append(Event(req.id, "", [], True, "error", error=reason, time=time.perf_counter()))
            self._release(req)
        self._cancelled.clear()
        return events

    # ------------------------------------------------------------------ convenience
    def run(self):
        """Step until every request is done, yielding events as they come."""
        while self.has_work():
            yield from self.step()

    def warm_up(self, lengths: list[int] | None = None) -> None:
        """Serve prompts of ``lengths`` tokens (each also one token longer) for two tokens each, so
        the prefill and commit kernels compile before a request waits for them (the CUDA-graph
        captures compile only the decode kernels; on an H200 a budget-0.3 warm-up took 11.3 s,
        run J in BENCHMARKS.md). Default: a short prompt and the longest of one whole chunk plus
        a few tokens (a later chunk, and a first chunk that evicts below budget 1.0), within the
        context. The pool's rows are empty again afterwards."""
        if lengths is None:
            lengths = [8, self.prefill_chunk + 8]
        longest = self.context - 3  # room for two new tokens
        vocab = self.model.config.vocab_size
        sizes = sorted({min(n + extra, longest) for n in lengths for extra in (0, 1)})
        prompts = [[1 + (7 * i) % (vocab - 1) for i in range(n)] for n in sizes if n > 0]
        self.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the account the benchmarks read (the warm-up's steps are not the workload's)."""
        # host seconds spent in each phase of step() (each phase ends on a host sync: the prefill
        # reads its logits, the decode its sampled tokens)
        self.phase_seconds = {"prefill": 0.0, "decode": 0.0}
        self.prefill_tokens = 0  # prompt (and context) tokens prefilled, beside the seconds
        # decode steps, the rows they decoded and the rows they ran over (their buckets' sizes);
        # the compactions before them and the decoding rows those moved (_compact)
        self.decode_counts = {"steps": 0, "rows_decoded": 0, "rows_run": 0, "compactions": 0, "rows_moved": 0}

    def generate(
        self, prompts: list, params: SamplingParams | None = None, *, context=None
    ) -> list[list[int]]:
        """Generated token ids of every prompt (text or ids; a final EOS included), served together;
        ``context`` (see :meth:`submit`) is read before each of them."""
        ids = [self.submit(p, params, context=context) for p in prompts]
        out: dict[str, list[int]] = {i: [] for i in ids}
        for event in self.run():
            out[event.request_id] += event.token_ids
        return [out[i] for i in ids]
