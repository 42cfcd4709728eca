"""Per-request decoding settings, token choice, and text pieces that never split a character.

Shared by the one-request stream (:mod:`baklava.runtime.streaming`) and the batching engine
(:mod:`baklava.runtime.engine`): the same settings and seed pick the same tokens in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baklava.errors import BaklavaError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; ``temperature == 0`` is greedy (and ignores the rest).

    ``ignore_eos`` keeps generating past the end-of-sequence token (benchmarks use it so every
    request produces exactly ``max_tokens``).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BaklavaError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise BaklavaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BaklavaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BaklavaError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (None: the global one)."""
        return None if self.seed is None else torch.Generator(device="cpu").manual_seed(self.seed)


def next_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick a token from ``logits [V]`` (greedy, or temperature / top-k / top-p sampling)."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


class TextPieces:
    """Turns a growing list of token ids into text deltas, holding back half a UTF-8 character.

    A fast tokenizer decodes incrementally (``tokenizers``' ``DecodeStream``: a few tokens of
    context per step, about a microsecond); any other decodes the whole sequence each step, which
    grows with the output (a 256-token answer costs ~20 us a token, a batching engine pays that
    for every row of every step). :meth:`flush` returns what the decoder still holds back, so the
    pieces always join to ``tokenizer.decode(ids, skip_special_tokens=True)`` (tested).
    Without a tokenizer (token-only serving, benchmarks) every piece is empty.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend, self._stream = None, None
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
            except ImportError:
                return
            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add ``token``; returns the new text it completes ('' while a character is incomplete)."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        if self._stream is not None:
            piece = self._stream.step(self._backend, token) or ""
            self.sent += piece
            return piece
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""  # (a decoder whose cleanup rewrites earlier text: nothing safe to add)
        piece, self.sent = text[len(self.sent) :], text
        return piece
