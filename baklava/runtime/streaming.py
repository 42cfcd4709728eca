"""Token-by-token generation with a budgeted cache, yielding text as it is produced.

This is what a server streams: one prompt, a fresh :class:`BudgetedCache` per request, greedy or
sampled decoding, text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from baklava.errors import BaklavaError
from baklava.runtime.generate import encode
from baklava.runtime.packed_cache import BudgetedCache


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; ``temperature == 0`` is greedy (and ignores the rest)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BaklavaError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise BaklavaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BaklavaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise BaklavaError(f"top_k must be >= 0, got {self.top_k}")


def _next_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick a token from ``logits [V]``."""
    if p.temperature == 0:
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


@torch.inference_mode()
def stream_generate(
    model, tokenizer, cache: BudgetedCache, prompt: str, params: SamplingParams, *, chat: bool = True
) -> Iterator[str]:
    """Yield the generated text in pieces; stops at EOS or ``params.max_tokens``.

    Raises :class:`BaklavaError` for an empty prompt or one over the model's context.
    """
    from baklava.runtime.attention import enable

    enable(model)
    context = model.config.max_position_embeddings
    batch = encode(tokenizer, [prompt], chat=chat, max_context=context)
    prompt_len = int(batch["input_ids"].shape[1])
    if prompt_len + params.max_tokens > context:
        raise BaklavaError(
            f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the context of {context}"
        )
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
    logits = model(input_ids=batch["input_ids"].to(device), past_key_values=cache).logits[0, -1]  # [V]
    ids: list[int] = []
    sent = ""
    eos = tokenizer.eos_token_id
    for _ in range(params.max_tokens):
        token = _next_token(logits.cpu(), params, generator)
        if token == eos:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(sent):  # hold back half a character
            yield text[len(sent) :]
            sent = text
        logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache).logits[0, -1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(sent):
        yield text[len(sent) :]
