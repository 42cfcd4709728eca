"""What each way of storing keys costs the next-token distribution, full cache, on the CPU.

Every key and value attention reads (the prompt's own included) goes through a format's round
trip, as the cache stores it; the model runs once per variant over the same text. Reported: the
KL divergence of each position's next-token distribution to float32's, top-1 agreement and the
perplexity over the second half (each position sees at least half the context). Variants:

* ``centred``: keys minus their head's mean key (``s = 1``), the smoothing before the balance;
* ``balanced``: centred and balanced per channel against the queries
  (:func:`baklava.runtime.kv_slots.channel_balance`, what ``BudgetedLayer.smooth_keys`` stores);
* int4's keys or values alone, to see which side loses;
* int4 with a scale per 64 channels instead of 32, and with values alone so;
* int4 with each group's scale a float16 of its own (8 bytes a vector at D = 128), the format
  before its two-level scales (a float16 top and a byte a group, 6 bytes:
  :func:`baklava.kv_format.group_scales`).

Means and balances come from the whole text (the runtime takes them from a row's first step)::

    python benchmarks/kv/key_balance.py qwen2.5-coder-0.5b          # or smollm2-135m, or a .gguf
    python benchmarks/kv/key_balance.py qwen2.5-coder-0.5b --tokens 1024 --json out.json
    python benchmarks/kv/key_balance.py qwen2.5-coder-0.5b --offsets 5000,12000,19000,26000 \
        --variants "int4 balanced,int4 balanced, float16 group scales"
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import click
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from baklava import kv_format
from baklava.model_zoo import load_model
from baklava.runtime.kv_slots import channel_balance

TEXT = ("BENCHMARKS.md", "DESIGN.md", "README.md")  # English and code, from the repository


def _float16_groups(x: torch.Tensor, fmt: kv_format.KVFormat) -> torch.Tensor:
    """int4's round trip with a float16 scale of its own a group (the format before two levels)."""
    g = kv_format._grouped(kv_format.hadamard(x.float()), fmt)
    scale = (g.abs().amax(-1, keepdim=True) / fmt.qmax).clamp(min=kv_format._TINY).half().float()
    back = ((g / scale).round().clamp(-fmt.qmax, fmt.qmax) * scale).reshape(x.shape)
    return kv_format.hadamard(back).to(x.dtype)


def _store(name: str | kv_format.KVFormat, balance: bool, sides: str = "kv", values=None, round_trip=None):
    """``(query, k, v) -> (k', v')``: what attention reads back from a cache in format ``name``
    (values in ``values`` where given; ``round_trip`` in place of the format's own)."""
    fmt = kv_format.parse(name)
    v_fmt = fmt if values is None else kv_format.parse(values)
    trip = round_trip or kv_format.round_trip

    def store(query, k, v):
        if not fmt.quantized:
            return k, v
        mu = k.mean(2, keepdim=True)
        s = channel_balance(query, k - mu)[:, :, None] if balance else torch.ones_like(mu)
        k_back = trip((k - mu) * s, fmt) / s + mu if "k" in sides else k
        v_back = trip(v, v_fmt) if "v" in sides else v
        return k_back, v_back

    return store


VARIANTS = {
    "float32": _store("auto", False),
    "fp8 centred": _store("fp8", False),
    "fp8 balanced": _store("fp8", True),
    "int8 centred": _store("int8", False),
    "int8 balanced": _store("int8", True),
    "int4 centred": _store("int4", False),
    "int4 balanced": _store("int4", True),
    "int4 balanced, keys only": _store("int4", True, "k"),
    "int4 values only": _store("int4", False, "v"),
    "int4 balanced, groups of 64": _store(replace(kv_format.parse("int4"), group=64), True),
    "int4 balanced, values in groups of 64": _store(
        "int4", True, values=replace(kv_format.parse("int4"), group=64)
    ),
    "int4 balanced, float16 group scales": _store("int4", True, round_trip=_float16_groups),
    "fp8 balanced, rotated": _store(replace(kv_format.parse("fp8"), rotate=True), True),
    "fp8 balanced, rotated keys": _store(
        replace(kv_format.parse("fp8"), rotate=True), True, values=kv_format.parse("fp8")
    ),
}


@click.command()
@click.argument("model", default="qwen2.5-coder-0.5b")
@click.option("--tokens", default=2048, show_default=True, help="Length of the text the model reads.")
@click.option(
    "--variants",
    default=",".join(VARIANTS),
    show_default=False,
    help="Comma-separated variants to run (default: all); float32, the reference, always runs.",
)
@click.option(
    "--offsets",
    default="5000",
    show_default=True,
    help="Comma-separated token offsets into the text, one window each (past the tables of contents).",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows here."
)
def main(model: str, tokens: int, variants: str, offsets: str, json_out: Path | None) -> None:
    # names may hold ", " themselves: split on commas not followed by a space
    chosen = ["float32"] + [
        v.strip() for v in re.split(r",(?! )", variants) if v.strip() not in ("", "float32")
    ]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(
            f"unknown variant {unknown[0]!r}; known: {'; '.join(VARIANTS)}", param_hint="--variants"
        )
    try:
        starts = [int(o) for o in offsets.split(",")]
    except ValueError as err:
        raise click.BadParameter(
            f"{offsets!r} is not a comma-separated list of integers", param_hint="--offsets"
        ) from err
    if min(starts) < 0:
        raise click.BadParameter(
            f"{offsets!r}: offsets count tokens from the start, >= 0", param_hint="--offsets"
        )
    lm = load_model(model, dtype=torch.float32, progress=False)
    text = "".join(Path(name).read_text() for name in TEXT)
    every = lm.tokenizer(text, return_tensors="pt").input_ids
    if every.shape[1] < max(starts) + tokens:
        raise click.ClickException(
            f"the repository's text has {every.shape[1]} tokens, not {max(starts) + tokens} (--offsets, --tokens)"
        )
    current = {"store": VARIANTS["float32"]}

    def attention(module, query, key, value, attention_mask, **kwargs):
        k, v = current["store"](query.float(), key.float(), value.float())
        return sdpa_attention_forward(
            module, query, k.to(key.dtype), v.to(value.dtype), attention_mask, **kwargs
        )

    AttentionInterface.register("baklava_key_balance", attention)
    lm.model.set_attn_implementation("baklava_key_balance")
    half = tokens // 2
    rows = []
    for offset in starts:
        ids = every[:, offset : offset + tokens]
        target = ids[0, 1:]

        def run(name: str, ids=ids) -> torch.Tensor:
            current["store"] = VARIANTS[name]
            with torch.no_grad():
                return lm.model(input_ids=ids).logits[0].float().log_softmax(-1)

        reference = run("float32")
        click.echo(f"{model}, tokens {offset}-{offset + tokens}, statistics over the last {tokens - half}")
        click.echo(f"{'variant':26s} {'KL':>8s} {'top-1':>6s} {'ppl':>8s}")
        for name in chosen:
            start = time.perf_counter()
            logp = reference if name == "float32" else run(name)
            kl = float((reference.exp() * (reference - logp)).sum(-1)[half:].mean())
            top1 = float((logp.argmax(-1) == reference.argmax(-1))[half:].float().mean())
            ppl = math.exp(float(-logp[:-1].gather(1, target[:, None])[half:].mean()))
            rows.append({"variant": name, "offset": offset, "kl": kl, "top1": top1, "ppl": ppl})
            click.echo(f"{name:26s} {kl:8.4f} {top1:6.3f} {ppl:8.3f}   ({time.perf_counter() - start:.0f} s)")
    if len(starts) > 1:
        click.echo(f"mean over {len(starts)} windows:")
        for name in chosen:
            mine = [r for r in rows if r["variant"] == name]
            kl = sum(r["kl"] for r in mine) / len(mine)
            top1 = sum(r["top1"] for r in mine) / len(mine)
            click.echo(f"{name:26s} {kl:8.4f} {top1:6.3f}")
    if json_out:
        meta = {"model": model, "tokens": tokens, "offsets": starts, "torch": torch.__version__, "text": TEXT}
        json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
