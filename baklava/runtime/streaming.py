"""Token-by-token generation with a budgeted cache, yielding text as it is produced.

This is what a server streams: one prompt, a fresh :class:`BudgetedCache` per request, greedy or
sampled decoding, text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from baklava.errors import BaklavaError
from baklava.runtime.cache_keyword import forward_cache
from baklava.runtime.generate import encode
from baklava.runtime.packed_cache import BudgetedCache
from baklava.runtime.sampling import SamplingParams, TextPieces, next_token

__all__ = ["SamplingParams", "stream_generate"]


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
    generator = params.generator()
    logits = model(input_ids=batch["input_ids"].to(device), **forward_cache(model, cache)).logits[
        0, -1
    ]  # [V]
    pieces = TextPieces(tokenizer)
    eos = tokenizer.eos_token_id
    for _ in range(params.max_tokens):
        token = next_token(logits.cpu(), params, generator)
        if token == eos and not params.ignore_eos:
            break
        piece = pieces.push(token)
        if piece:
            yield piece
        logits = model(
            input_ids=torch.tensor([[token]], device=device), **forward_cache(model, cache)
        ).logits[0, -1]
    rest = pieces.flush()
    if rest:
        yield rest
