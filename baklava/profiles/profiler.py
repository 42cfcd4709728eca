"""One pass of a model over calibration text, recording per-head and per-layer importance.

The model runs with a recording attention implementation (``baklava_profile``: eager attention
that hands queries, values, weights and outputs to every :class:`HeadScorer`) plus two hooks per
decoder layer for the layer proxy (SqueezeAttention)::

    layer_score_l = mean_t 1 - cos(x_t, x_t + attn_l(x_t))      x: the layer's residual input

Per query head the scorers' per-token values are averaged over tokens and samples; query heads
are then reduced to their KV head by each scorer's ``group_reduce`` (the mean, or the max; both are
kept in the raw stats). Scorers marked ``repeated`` (retrieval) read a second pass in which each
window's first half is repeated, ``[x, x]``, so that every token of the second copy has a source
to copy from; the layer proxy reads the first pass only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from baklava.profiles.calibration import CalibrationSet
from baklava.profiles.head_scores import HeadScores
from baklava.profiles.scorers import DEFAULT_SCORER, SCORERS, HeadScorer

PROFILE_IMPLEMENTATION = "baklava_profile"
_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("baklava_recorder", default=None)


class _Running:
    """Running sum / sum of squares / count of an array statistic."""

    def __init__(self, shape: tuple[int, ...]):
        self.sum = np.zeros(shape)
        self.sumsq = np.zeros(shape)
        self.count = np.zeros(shape)

    def add(self, index, values: torch.Tensor) -> None:
        """Add per-token ``values [..., T]`` at ``index`` (leading dims must match the slot)."""
        v = values.double()
        self.sum[index] += v.sum(-1).cpu().numpy()
        self.sumsq[index] += (v * v).sum(-1).cpu().numpy()
        self.count[index] += v.shape[-1]

    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1)

    def std(self) -> np.ndarray:
        m = self.mean()
        return np.sqrt(np.maximum(self.sumsq / np.maximum(self.count, 1) - m * m, 0))


class _Recorder:
    def __init__(self, scorers: list[HeadScorer], num_layers: int, num_q_heads: int, skip_first: int):
        self.scorers = scorers
        self.heads = {s.name: _Running((num_layers, num_q_heads)) for s in scorers}
        self.layer = _Running((num_layers,))
        self.skip_first = skip_first
        self.repeated = False  # which pass runs: plain windows, or first halves repeated

    def observe_heads(self, layer_idx: int, **tensors) -> None:
        for scorer in self.scorers:
            if scorer.repeated != self.repeated:
                continue
            per_token = scorer.score(**tensors)  # [B, H_q, T]
            self.heads[scorer.name].add(layer_idx, per_token.sum(0) / per_token.shape[0])

    def observe_layer(self, layer_idx: int, x: torch.Tensor, attn_out: torch.Tensor) -> None:
        if self.repeated:
            return
        s = self.skip_first
        cos = F.cosine_similarity(x[:, s:].float(), (x + attn_out)[:, s:].float(), dim=-1, eps=1e-6)
        self.layer.add(layer_idx, (1.0 - cos).mean(0))  # [T]


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (``[B, H, S, D]`` in, ``[B, S, H_q, D]`` out) that feeds the active recorder."""
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)  # [B, H_q, S, D]
    values = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query @ keys.transpose(-1, -2)).float() * scale  # [B, H_q, S, S]
    if attention_mask is not None:
        logits = logits + attention_mask[..., : keys.shape[-2]].float()
    weights = torch.softmax(logits, dim=-1)
    output = (weights.to(values.dtype) @ values).contiguous()  # [B, H_q, S, D]
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.observe_heads(module.layer_idx, query=query, values=values, weights=weights, output=output)
    return output.transpose(1, 2).contiguous(), None


def repeat_half(ids: torch.Tensor) -> torch.Tensor:
    """``[x, x]`` with ``x`` the first half of ``ids`` (same length, rounded down to even)."""
    half = ids[: ids.numel() // 2]
    return torch.cat([half, half])


@contextlib.contextmanager
def _recording(model, recorder: _Recorder) -> Iterator[None]:
    AttentionInterface.register(PROFILE_IMPLEMENTATION, _recording_attention)
    AttentionMaskInterface.register(PROFILE_IMPLEMENTATION, eager_mask)
    previous = model.config._attn_implementation
    handles, inputs = [], {}
    for idx, layer in enumerate(model.model.layers):

        def pre(mod, args, kwargs, idx=idx):
            inputs[idx] = kwargs.get("hidden_states", args[0] if args else None)

        def post(mod, args, output, idx=idx):
            recorder.observe_layer(idx, inputs.pop(idx), output[0] if isinstance(output, tuple) else output)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post))
    token = _RECORDER.set(recorder)
    model.set_attn_implementation(PROFILE_IMPLEMENTATION)
    try:
        yield
    finally:
        _RECORDER.reset(token)
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)


def profile_model(
    model,
    calibration: CalibrationSet,
    *,
    method: str = DEFAULT_SCORER,
    skip_first: int = 32,
    progress: bool = True,
) -> HeadScores:
    """Score every KV head and layer of ``model`` on ``calibration``.

    Parameters
    ----------
    model : transformers model
        A Llama / Qwen2 / Mistral causal LM.
    calibration : CalibrationSet
        Token windows, run one at a time (batch 1, no padding).
    method : str
        The scorer whose means become ``HeadScores.kv_head``; every registered scorer is recorded
        in ``raw`` so profiles can be compared without re-running.

    Returns
    -------
    HeadScores
        ``kv_head [L, H_kv]``, ``layer [L]`` and raw statistics.
    """
    if method not in SCORERS:
        raise ValueError(f"unknown scorer {method!r}; known: {', '.join(SCORERS)}")
    cfg = model.config
    num_layers, num_q = cfg.num_hidden_layers, cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_q
    scorers = [cls(skip_first=skip_first) for cls in SCORERS.values()]
    recorder = _Recorder(scorers, num_layers, num_q, skip_first)
    device = next(model.parameters()).device
    passes = [(False, ids) for ids in calibration.samples]
    if any(s.repeated for s in scorers):
        passes += [(True, repeat_half(ids)) for ids in calibration.samples]
    with _recording(model, recorder), torch.inference_mode():
        for repeated, ids in tqdm(passes, desc="profiling", unit="pass", disable=not progress):
            recorder.repeated = repeated
            model(input_ids=ids[None].to(device), use_cache=False)

    raw: dict = {"calibration": calibration.to_dict(), "skip_first": skip_first, "scorers": {}}
    kv_scores = {}
    for scorer in scorers:
        stat = recorder.heads[scorer.name]
        q_mean = stat.mean()  # [L, H_q]
        grouped = q_mean.reshape(num_layers, num_kv, num_q // num_kv)
        kv_scores[scorer.name] = grouped.max(-1) if scorer.group_reduce == "max" else grouped.mean(-1)
        raw["scorers"][scorer.name] = {
            "q_head_mean": np.round(q_mean, 6).tolist(),
            "q_head_std": np.round(stat.std(), 6).tolist(),
            "kv_head_mean": np.round(grouped.mean(-1), 6).tolist(),
            "kv_head_max": np.round(grouped.max(-1), 6).tolist(),
            "tokens_per_head": int(stat.count.max()),
        }
    raw["layer"] = {
        "mean": np.round(recorder.layer.mean(), 6).tolist(),
        "std": np.round(recorder.layer.std(), 6).tolist(),
    }
    return HeadScores(kv_scores[method], recorder.layer.mean(), method=method, raw=raw)
