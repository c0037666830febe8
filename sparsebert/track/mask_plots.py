"""Pictures of attention masks, as a run logs them: heatmaps of the mask and of DAM's importance σ(α), and the
importance by distance |i − j| (the paper's figures), with the spread across heads and positions around its mean
(:mod:`sparsebert.track.importance` says when a difference between distances is noise).

Every heatmap has query/key axes, a legend (boolean masks: attended vs masked) or a colour bar (importance),
the sparsity in its title, and says which layers it stands for (a mask shared by all layers is drawn once);
heads with the same mask share one panel. Cells are drawn at 4 px or more up to L = 192, so a 128 × 128 mask is
legible in MLflow's artifact view; a whole figure takes well under a second, cheap enough for a stage switch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only; training nodes have no display
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from sparsebert.model.masks import distance_matrix
from sparsebert.track.importance import distance_profile

DPI = 100
ATTENDED, MASKED = "#1f4e79", "#eeeeee"
MASK_CMAP = ListedColormap([MASKED, ATTENDED])
# Large enough to read when MLflow's artifact view scales a figure down to its pane.
FONTS = {"font.size": 12, "axes.titlesize": 12, "figure.titlesize": 15, "legend.fontsize": 11}


def layer_groups(tensor: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive layers of ``[layers, heads, L, L]`` holding the same tensor (one run when shared)."""
    groups: list[list[int]] = []
    for layer in range(tensor.shape[0]):
        if groups and torch.equal(tensor[layer], tensor[groups[-1][0]]):
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def mask_figures(name: str, mask: torch.Tensor, importance: torch.Tensor | None, out: Path) -> list[Path]:
    """Every picture of a logged mask ``[layers, heads, L, L]`` (bool) and, for a learned one, its importance
    σ(α) of the same shape: ``mask_layer{l}.png`` and ``importance_layer{l}.png`` for each run of identical
    layers starting at ``l``, and ``importance_by_distance.png``."""
    layers = mask.shape[0]
    paths = [
        heatmaps(
            mask[group[0]], out / f"mask_layer{group[0]}.png", f"{name}: mask, {layers_label(group, layers)}"
        )
        for group in layer_groups(mask)
    ]
    if importance is not None:
        groups = layer_groups(importance)
        paths += [
            heatmaps(
                importance[group[0]],
                out / f"importance_layer{group[0]}.png",
                f"{name}: importance σ(α), {layers_label(group, layers)}",
            )
            for group in groups
        ]
        paths.append(
            importance_by_distance(
                [(importance[g[0]], layers_label(g, layers)) for g in groups],
                out / "importance_by_distance.png",
                f"{name}: mean importance by distance",
            )
        )
    return paths


def heatmaps(values: torch.Tensor, path: Path, title: str) -> Path:
    """:func:`heatmap_figure` saved to ``path``."""
    return _save(heatmap_figure(values, title), path)


def importance_by_distance(per_layer: list[tuple[torch.Tensor, str]], path: Path, title: str) -> Path:
    """:func:`distance_figure` saved to ``path``."""
    return _save(distance_figure(per_layer, title), path)


@plt.rc_context(FONTS)
def heatmap_figure(values: torch.Tensor, title: str) -> Figure:
    """One layer's ``[heads, L, L]`` mask (bool) or importance (in [0, 1]): a panel per distinct head mask,
    query i down, key j across."""
    boolean = values.dtype == torch.bool
    values = values.detach().float().cpu()
    panels = _head_panels(values)
    seq_len = values.shape[-1]
    side = min(max(4 * seq_len, 256), 768) / DPI + 1.0  # image ≥ 4 px per cell up to L = 192, plus its labels
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols + 1.4, side * rows + 0.9), squeeze=False, layout="constrained"
    )
    image = None
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (heads, panel) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(
            panel.numpy(),
            cmap=MASK_CMAP if boolean else "viridis",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        label = f"head {heads[0]}" if len(heads) == 1 else _heads(heads, values.shape[0])
        detail = f"sparsity {_sparsity(panel):.1%}" if boolean else f"mean σ(α) {float(panel.mean()):.3f}"
        ax.set_title(f"{label}: {detail}")
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
    if boolean:
        title += f" (sparsity {_sparsity(values):.1%})"
        fig.legend(
            handles=[Patch(color=ATTENDED, label="attended"), Patch(color=MASKED, label="masked", ec="#999")],
            loc="outside right upper",
        )
    else:
        fig.colorbar(image, ax=axes, label="importance σ(α) (kept if > 0.5)", shrink=0.8)
    fig.suptitle(title)
    return fig


@plt.rc_context(FONTS)
def distance_figure(per_layer: list[tuple[torch.Tensor, str]], title: str) -> Figure:
    """Mean σ(α) at each distance |i − j| per head, a panel for each ``([heads, L, L] importance, layers)``."""
    fig, axes = plt.subplots(
        len(per_layer), 1, figsize=(8, 4 * len(per_layer)), squeeze=False, layout="constrained"
    )
    for ax, (importance, layers) in zip(axes.flat, per_layer, strict=True):
        seq_len = importance.shape[-1]
        distance = distance_matrix(seq_len, torch.device("cpu")).flatten()
        counts = torch.bincount(distance, minlength=seq_len).float()
        for h in range(importance.shape[0]):
            sums = torch.zeros(seq_len).index_add_(
                0, distance, importance[h].detach().float().cpu().flatten()
            )
            ax.plot((sums / counts).numpy(), label=f"head {h}", linewidth=1.2)
        _mean_with_spread(ax, importance)
        ax.axhline(0.5, color="#888", linestyle="--", linewidth=0.8, label="kept above (0.5)")
        ax.set_xlabel("distance |i − j| between query and key (0 = diagonal)")
        ax.set_ylabel("mean importance σ(α)")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, seq_len - 1)
        ax.set_title(layers)
        ax.legend(ncol=1 + importance.shape[0] // 9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title)
    return fig


def _mean_with_spread(ax, importance: torch.Tensor) -> None:
    """The mean over heads and positions at each distance, in a band of ± their standard deviation: where the
    band is wider than the differences between distances, those differences are the search's noise."""
    profile = distance_profile(importance)
    x = torch.arange(len(profile.mean)).numpy()
    ax.plot(x, profile.mean.numpy(), color="black", linewidth=1.6, label="mean of heads")
    low, high = (profile.mean - profile.spread).numpy(), (profile.mean + profile.spread).numpy()
    ax.fill_between(x, low, high, color="black", alpha=0.12, label="± std over heads, positions")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _head_panels(values: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """``(heads, panel)`` for each distinct head of ``[heads, L, L]``, heads with the same values together."""
    panels: list[tuple[list[int], torch.Tensor]] = []
    for h in range(values.shape[0]):
        same = next((heads for heads, panel in panels if torch.equal(panel, values[h])), None)
        if same is None:
            panels.append(([h], values[h]))
        else:
            same.append(h)
    return panels


def _sparsity(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.float().mean())


def layers_label(group: list[int], layers: int) -> str:
    """Which of a model's ``layers`` a picture of the run of layers ``group`` stands for."""
    if len(group) == layers:
        return f"shared by all {layers} layers" if layers > 1 else "the model's one layer"
    return f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}–{group[-1]} (same mask)"


def _heads(heads: list[int], count: int) -> str:
    return f"all {count} heads" if len(heads) == count else "heads " + ", ".join(map(str, heads))
