"""Pictures of attention masks: per-head heatmaps and DAM's importance by distance (the paper's figures)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; training nodes have no display
import matplotlib.pyplot as plt
import torch

from sparsebert.masks import distance_matrix


def head_heatmaps(mask: torch.Tensor, path: Path, title: str) -> Path:
    """One panel per head of a ``[heads, L, L]`` mask (bool, or importance in [0, 1])."""
    heads = mask.shape[0]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        ax.axis("off")
        if h < heads:
            ax.imshow(mask[h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def importance_by_distance(importance: torch.Tensor, path: Path, title: str) -> Path:
    """Mean σ(α) at each distance |i − j| per head, from ``[heads, L, L]`` importances."""
    seq_len = importance.shape[-1]
    distance = distance_matrix(seq_len, importance.device)
    counts = torch.bincount(distance.flatten(), minlength=seq_len).float()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for h in range(importance.shape[0]):
        sums = torch.zeros(seq_len).index_add_(
            0, distance.flatten().cpu(), importance[h].flatten().float().cpu()
        )
        ax.plot((sums / counts).numpy(), label=f"head {h}", linewidth=1)
    ax.set_xlabel("distance |i − j|")
    ax.set_ylabel("mean importance σ(α)")
    ax.set_title(title)
    if importance.shape[0] <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
