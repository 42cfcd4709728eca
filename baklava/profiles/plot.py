"""Heatmaps of a profile: head scores and capacities (layers x KV heads), plus the layer proxy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from baklava.atomic import save_figure_atomic
from baklava.profiles.profile_file import BudgetProfile


def plot_profile(profile: BudgetProfile, path: str | os.PathLike) -> Path:
    """Write a PNG with up to three panels; returns the path. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = profile.scores
    num_layers, num_heads = scores.shape
    panels = 3 if profile.capacities is not None else 2
    fig, axes = plt.subplots(
        1, panels, figsize=(3.2 * panels + 1.5, max(4.0, num_layers * 0.2)), gridspec_kw={"wspace": 0.6}
    )
    aspect = "auto"

    im = axes[0].imshow(scores.kv_head, aspect=aspect, cmap="viridis", interpolation="nearest")
    axes[0].set_title(f"head importance\n({scores.method})")
    fig.colorbar(im, ax=axes[0], fraction=0.08)

    axes[1].barh(np.arange(num_layers), scores.layer, color="tab:orange")
    axes[1].set_ylim(num_layers - 0.5, -0.5)  # same rows as the heatmaps
    axes[1].set_title("layer proxy\n1 - cos(x, x + attn)")

    if profile.capacities is not None:
        alloc = profile.allocation or {}
        im = axes[2].imshow(profile.capacities, aspect=aspect, cmap="magma", interpolation="nearest")
        axes[2].set_title(f"capacity (tokens)\n{alloc.get('method', '?')}, budget {alloc.get('budget', '?')}")
        fig.colorbar(im, ax=axes[2], fraction=0.08)

    for ax in axes:
        ax.set_ylabel("layer")
    for ax in (axes[0], *axes[2:]):
        ax.set_xlabel("KV head")
        ax.set_xticks(range(num_heads))
    fig.suptitle(f"BaKlaVa profile: {profile.model.name}", y=0.995)

    return save_figure_atomic(fig, path)
