"""Quality at equal KV memory: every (method, budget, KV dtype) cell of a run placed by its bytes.

A budget cuts the tokens a head keeps and a quantized format the bytes of each kept token; the two
multiply, so budget 0.3 at int4 stores fewer bytes than budget 0.1 in bf16. Which one scores
higher is what a user sizing a deployment wants to know. Each cell's KV bytes are given as a share
of the full cache stored in bf16 (``auto`` counted as bf16, what a GPU deployment stores, whatever
dtype the benchmark computed in): ``budget x bytes per channel / 2``, with the format's scales
counted (:meth:`baklava.kv_format.KVFormat.element_bytes`). A cell is on the **frontier** when no
cell of fewer or equal bytes scores higher.
"""

from __future__ import annotations

from baklava import kv_format

DEPLOYED_BYTES = 2  # bf16: the full cache every share is measured against


def bytes_share(kv_dtype: str, budget: float, head_dim: int) -> float:
    """KV bytes of ``budget`` at ``kv_dtype`` over the full bf16 cache's (scales included)."""
    return budget * kv_format.element_bytes(kv_dtype, head_dim, DEPLOYED_BYTES) / DEPLOYED_BYTES


def points(table: dict, head_dim: int | None) -> list[dict]:
    """Every cell of a KV-dtype table (:func:`baklava.bench.quality.report.kv_dtype_table`) with its
    ``kv_bytes_share``, sorted by it, each flagged ``frontier`` (by score) and ``ppl_frontier`` (no
    cell of fewer bytes has a lower perplexity); ``[]`` without a table or head size."""
    if not table or not head_dim:
        return []
    out = []
    for kv in table["formats"]:
        for method, line in table["average"][kv].items():
            for budget, score in line.items():
                if budget == 1.0 and method != "full":  # every method at 1.0 is the full cache
                    continue
                ppl = table["ppl"].get(kv, {}).get(method, {}).get(budget)
                out.append(
                    {
                        "method": method,
                        "budget": budget,
                        "kv_dtype": kv,
                        "kv_bytes_share": bytes_share(kv, budget, head_dim),
                        "score": score,
                        "ppl": ppl,
                    }
                )
    out.sort(key=lambda p: (p["kv_bytes_share"], -p["score"]))
    best, lowest = float("-inf"), float("inf")
    for p in out:  # in order of bytes: a cell beats every cheaper one or it is dominated
        p["frontier"] = p["score"] > best
        best = max(best, p["score"])
        p["ppl_frontier"] = p["ppl"] is not None and p["ppl"] < lowest
        lowest = min(lowest, p["ppl"] if p["ppl"] is not None else lowest)
    return out


def markdown_lines(found: list[dict]) -> list[str]:
    """The table of :func:`points` (bold: on the frontier)."""
    if not found:
        return []
    lines = [
        "**Quality at equal KV memory** (KV bytes as a share of the full cache in bf16, scales "
        "included; `auto` counted as bf16; bold: no cell of fewer bytes scores higher, or has a lower "
        "perplexity)",
        "",
        "| KV bytes | method | budget | KV dtype | score | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for p in found:
        score = f"**{p['score']:.3f}**" if p["frontier"] else f"{p['score']:.3f}"
        ppl = "" if p["ppl"] is None else f"**{p['ppl']:.3f}**" if p["ppl_frontier"] else f"{p['ppl']:.3f}"
        lines.append(
            f"| {p['kv_bytes_share']:.3f} | {p['method']} | {p['budget']:g} | {p['kv_dtype']} | {score} | {ppl} |"
        )
    return lines + [""]


def plot_panel(ax, found: list[dict], metric: str = "score") -> None:
    """``metric`` (``score`` or ``ppl``) against KV bytes: a line per method and KV dtype (ending
    at that dtype's full cache, a star), one colour per dtype, the frontier dashed."""
    found = [p for p in found if p[metric] is not None]
    colours: dict[str, str] = {}
    lines: dict[tuple[str, str], list[dict]] = {}
    for p in found:
        colours.setdefault(p["kv_dtype"], f"C{len(colours)}")
        lines.setdefault((p["method"], p["kv_dtype"]), []).append(p)
    starred = False
    for (method, kv), line in lines.items():
        if method == "full":
            xs, ys = [p["kv_bytes_share"] for p in line], [p[metric] for p in line]
            ax.plot(xs, ys, "*", ms=10, color=colours[kv], label=None if starred else "full cache")
            starred = True
            continue
        line = line + lines.get(("full", kv), [])
        ax.plot(
            [p["kv_bytes_share"] for p in line], [p[metric] for p in line], marker="o", ms=4,
            color=colours[kv], lw=2.0 if method == "baklava" else 1.0,
            ls="-" if method == "baklava" else ":", label=f"{method} {kv}",
        )  # fmt: skip
    edge = [p for p in found if p["frontier" if metric == "score" else "ppl_frontier"]]
    xs, ys = [p["kv_bytes_share"] for p in edge], [p[metric] for p in edge]
    ax.step(xs, ys, where="post", color="grey", ls="--", lw=0.8, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes (share of the full bf16 cache)")
    ax.set_ylabel("mean score" if metric == "score" else "perplexity (lower is better)")
    ax.set_title(f"{'quality' if metric == 'score' else 'perplexity'} at equal KV memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
