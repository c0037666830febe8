"""The study's three figures (PNG, in ``output_dir/figures/`` and on the study's MLflow run):

* ``tradeoff.png``: sparsity against the average score, one point per arm, the Pareto front marked (the arms no
  other arm beats on both), the reference as a line, and the paper's points when the table has them;
* ``mask_gallery.png``: every arm's mask (first layer; grey where only some heads attend) above its importance
  by distance (σ(α) per head for a DAM mask; for a fixed pattern the share of positions kept at each distance);
* ``importance_over_search.png``: for every DAM arm, the mean σ(α) of the diagonal, the near band and the far
  band at each snapshot of the search (:mod:`sparsebert.track.importance_snapshots`), the spread over heads shaded: the
  figure that shows whether the diagonal falls first.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import torch

from sparsebert.study.paper import PaperRow
from sparsebert.track.importance_snapshots import BANDS, bands, by_distance, near_width
from sparsebert.track.mask_plots import FONTS, MASK_CMAP

DPI = 100
BAND_COLOURS = {"diagonal": "#d62728", "near": "#1f77b4", "far": "#7f7f7f"}


@dataclass
class ArmMasks:
    """What the figures show of one arm: its final mask ``[layers, heads, L, L]`` (bool), DAM's importance at the
    freeze (same shape) and the search's snapshots ``(step, [layers, heads, L])``."""

    name: str
    mask: torch.Tensor | None
    importance: torch.Tensor | None = None
    snapshots: list[tuple[int, torch.Tensor]] | None = None
    search_steps: int = 0


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """The names of the points (name, sparsity, score) no other point matches or beats on both, by sparsity."""
    front = [
        (name, x, y)
        for name, x, y in points
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for _, x2, y2 in points)
    ]
    return [name for name, _, _ in sorted(front, key=lambda p: p[1])]


@plt.rc_context(FONTS)
def tradeoff(summary: dict, path: Path, paper: dict[str, PaperRow] | None = None) -> Path:
    points = [
        (a["arm"], a["sparsity"], a["avg"])
        for a in summary["arms"]
        if a["avg"] is not None and a["sparsity"] is not None
    ]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    xs = {name: (x, y) for name, x, y in points}
    ax.scatter([x for _, x, _ in points], [y for _, _, y in points], color="#1f4e79", zorder=3, label="arms")
    if front:
        ax.plot([xs[n][0] for n in front], [xs[n][1] for n in front], color="#d62728", linewidth=1.5,
                marker="o", markersize=10, markerfacecolor="none", zorder=4, label="Pareto front")  # fmt: skip
    for name, x, y in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=10)
    if summary["reference"] in xs:
        ax.axhline(xs[summary["reference"]][1], color="#888", linestyle="--", linewidth=0.8,
                   label=f"{summary['reference']} (reference)")  # fmt: skip
    shown = [(arm, row) for arm, row in (paper or {}).items()]
    if shown:
        ax.scatter([r.sparsity for _, r in shown], [r.avg for _, r in shown], marker="s", facecolors="none",
                   edgecolors="#999", label="paper (BERT-base)", zorder=2)  # fmt: skip
        for _, row in shown:
            ax.annotate(
                row.label,
                (row.sparsity, row.avg),
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=8,
                color="#777",
            )
    ax.set_xlabel("sparsity: masked attention positions (%)")
    ax.set_ylabel(
        "average score (%)" + (" over GLUE" if any(c["task"] == "mnli" for c in summary["columns"]) else "")
    )
    ax.set_title("sparsity against score: the arms no other beats on both form the Pareto front")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


@plt.rc_context(FONTS)
def mask_gallery(arms: list[ArmMasks], path: Path) -> Path:
    shown = [a for a in arms if a.mask is not None]
    cols = min(len(shown), 6) or 1
    rows = math.ceil(len(shown) / cols) or 1
    fig, axes = plt.subplots(
        2 * rows, cols, figsize=(3.2 * cols, 6.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for index, arm in enumerate(shown):
        top, bottom = axes[2 * (index // cols), index % cols], axes[2 * (index // cols) + 1, index % cols]
        mask = arm.mask[0].float()  # the first layer: [heads, L, L]
        top.axis("on")
        shared = bool((mask == mask[0]).all())  # every head the same: attended / masked
        top.imshow(
            mask.mean(0).numpy(),
            cmap=MASK_CMAP if shared else "Blues",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        top.set_title(f"{arm.name}\nsparsity {1 - float(arm.mask.float().mean()):.1%}", fontsize=11)
        top.set_xticks([])
        top.set_yticks([])
        bottom.axis("on")
        profile = by_distance(arm.importance[0] if arm.importance is not None else mask)  # [heads, L]
        for head in profile:
            bottom.plot(head.numpy(), linewidth=1)
        bottom.axhline(0.5, color="#888", linestyle="--", linewidth=0.6)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_xlabel("distance |i − j|")
        bottom.set_ylabel("importance σ(α)" if arm.importance is not None else "share kept")
    _title(
        fig,
        "masks (first layer; darker: more heads attend) and importance by distance, one line per head",
        cols,
    )
    return _save(fig, path)


@plt.rc_context(FONTS)
def importance_over_search(arms: list[ArmMasks], path: Path) -> Path | None:
    searched = [a for a in arms if a.snapshots]
    if not searched:
        return None
    cols = min(len(searched), 4)
    rows = math.ceil(len(searched) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(searched) :]:
        ax.axis("off")
    for ax, arm in zip(axes.flat, searched, strict=False):
        steps = [step for step, _ in arm.snapshots]
        per_band = {name: [] for name in BANDS}
        for _, profile in arm.snapshots:
            for name, value in bands(profile.flatten(0, -2)).items():  # per (layer, head)
                per_band[name].append(value)
        for name in BANDS:
            values = torch.stack(per_band[name])  # [snapshots, layers × heads]
            ax.plot(
                steps,
                values.mean(1).numpy(),
                color=BAND_COLOURS[name],
                linewidth=2,
                label=_band_label(name, arm),
            )
            ax.fill_between(
                steps,
                values.min(1).values.numpy(),
                values.max(1).values.numpy(),
                color=BAND_COLOURS[name],
                alpha=0.15,
            )
        ax.axhline(0.5, color="#888", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("pre-training step (the search)")
        ax.set_ylabel("mean importance σ(α)")
        ax.set_title(arm.name)
        ax.legend(loc="best", fontsize=9)
    _title(
        fig, "importance over the search: diagonal, near band and far band (shaded: spread over heads)", cols
    )
    return _save(fig, path)


def _band_label(name: str, arm: ArmMasks) -> str:
    seq_len = arm.snapshots[0][1].shape[-1]
    width = near_width(seq_len)
    return {"diagonal": "diagonal |i − j| = 0", "near": f"near band 1–{width}", "far": f"far band > {width}"}[
        name
    ]


def _title(fig, text: str, cols: int) -> None:
    """A title wrapped to the figure's width (a gallery of one or two arms is narrow)."""
    fig.suptitle(textwrap.fill(text, 36 * cols), fontsize=11)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
