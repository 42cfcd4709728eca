"""Greedy generation with a budgeted cache: what ``baklava-run`` calls.

Two entry points that read top to bottom:

* :func:`generate` - ``model.generate(cache=BudgetedCache)`` for a batch of prompts;
* :func:`prefill` / :func:`decode_one_token` - the same thing step by step, returning logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baklava.errors import BaklavaError
from baklava.runtime.attention import enable
from baklava.runtime.cache_keyword import forward_cache, generate_cache
from baklava.runtime.packed_cache import BudgetedCache


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]  # generated tokens only
    prompt_tokens: int


def encode(tokenizer, prompts: list[str], *, chat: bool, max_context: int) -> dict:
    """Tokenize ``prompts`` (left-padded), with the chat template when ``chat``; check the context."""
    if not prompts or any(not p.strip() for p in prompts):
        raise BaklavaError("every prompt must be non-empty")
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    else:
        texts = list(prompts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    longest = int(batch["attention_mask"].sum(1).max())
    if longest > max_context:
        raise BaklavaError(f"prompt has {longest} tokens, over the model's context of {max_context}")
    return dict(batch)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    cache: BudgetedCache,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    chat: bool = True,
    fused: bool = True,
):
    """Greedy-decode ``prompts`` as one batch with ``cache``; returns one :class:`Generation` each.

    On a CUDA device the prompt is prefilled once and every decode step is one CUDA graph replay
    (:mod:`baklava.runtime.cuda_graph`); with ``fused`` the model's layers first get the fused
    one-token forward (:mod:`baklava.runtime.fused_decode`: the model is changed in place, for the
    architectures it supports). Elsewhere ``model.generate`` runs the same greedy search.
    """
    enable(model)
    device = next(model.parameters()).device
    batch = encode(tokenizer, prompts, chat=chat, max_context=model.config.max_position_embeddings)
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        from baklava.runtime import fused_decode

        if fused:
            fused_decode.fuse(model)
        new = _greedy_cuda_graph(model, cache, batch["input_ids"], batch["attention_mask"], max_new_tokens)
    else:
        out = model.generate(
            **batch,
            **generate_cache(model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
    results = []
    for i, prompt in enumerate(prompts):
        ids = new[i].tolist()
        if tokenizer.eos_token_id in ids:  # keep up to and including the first EOS
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        results.append(Generation(prompt, text, ids, int(batch["attention_mask"][i].sum())))
    return results


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, S]`` of a left-padded batch: each token's count of real tokens before it."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def _greedy_cuda_graph(model, cache, ids, mask, steps: int) -> torch.Tensor:
    """``[B, steps]`` greedy tokens: one prefill (left padding masked, positions counted per row),
    then the decode steps as CUDA graph replays. Rows run on past their EOS (cut by the caller)."""
    from baklava.runtime.cuda_graph import greedy_cuda_graph

    positions = positions_from_mask(mask)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **forward_cache(model, cache),
        logits_to_keep=1,
    ).logits[:, -1]
    return greedy_cuda_graph(model, cache, logits.argmax(-1), steps)


@torch.inference_mode()
def prefill(
    model, cache: BudgetedCache, input_ids: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Run the prompt ``[B, S]`` through the model into ``cache``; returns last logits ``[B, V]``.

    With ``chunk``, the prompt goes in ``chunk``-token pieces and the cache evicts after each one,
    so attention never holds more than the budget plus one chunk of keys (one pass holds all
    ``S``). Scores then accumulate over the chunks' observation windows (H2O-style) instead of
    coming from the prompt's last ``obs_window`` queries alone, so what is kept can differ.
    """
    enable(model)
    if chunk is not None and chunk < 1:
        raise BaklavaError(f"prefill chunk must be >= 1, got {chunk}")
    step = chunk or input_ids.shape[1]
    for start in range(0, input_ids.shape[1], step):
        logits = model(
            input_ids=input_ids[:, start : start + step], **forward_cache(model, cache), logits_to_keep=1
        ).logits
    return logits[:, -1]


@torch.inference_mode()
def decode_one_token(model, cache: BudgetedCache, token: torch.Tensor) -> torch.Tensor:
    """Feed one token per row ``[B, 1]``; returns next-token logits ``[B, V]``."""
    return model(input_ids=token, **forward_cache(model, cache)).logits[:, -1]
