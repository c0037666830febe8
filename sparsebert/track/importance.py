"""DAM's importance by distance with its uncertainty: is a difference between distances signal or noise?

A search's importance σ(α) ``[layers, heads, L, L]`` is summarised per distance |i − j| by its mean and its spread
across heads and positions (:func:`distance_profile`); the rank of one distance (the diagonal, d = 0, which the
paper finds least important) comes with a bootstrap interval over those heads and positions
(:func:`rank_interval`); and several runs (seeds, recipes) are compared by the mean and spread of their profiles
(:func:`across_runs`, :func:`runs_figure`). A rank whose interval spans most distances says the search has not
told that distance apart from the others: at small scale much of σ(α)'s spread is the search's own noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; training nodes have no display
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from sparsebert.model.dam_logits import distance_matrix


@dataclass(frozen=True)
class DistanceProfile:
    """Importance at each distance ``d = 0 … L − 1``: ``mean`` over every (layer, head, position) at d, ``spread``
    their standard deviation, ``head_spread`` the standard deviation of the per-head means, ``count`` how many."""

    mean: torch.Tensor
    spread: torch.Tensor
    head_spread: torch.Tensor
    count: torch.Tensor


def _by_distance(importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values ``[heads', L·L]`` with layers folded into heads, each position's distance ``[L·L]``)."""
    values = importance.detach().float().cpu()
    seq_len = values.shape[-1]
    return values.reshape(-1, seq_len * seq_len), distance_matrix(seq_len).flatten()


def distance_profile(importance: torch.Tensor) -> DistanceProfile:
    """The profile of an importance ``[..., heads, L, L]`` (leading dims, e.g. layers, count as more heads)."""
    values, distance = _by_distance(importance)
    seq_len = importance.shape[-1]
    per_distance = torch.zeros(values.shape[0], seq_len).index_add_(1, distance, values)
    squares = torch.zeros(values.shape[0], seq_len).index_add_(1, distance, values**2)
    positions = torch.bincount(distance, minlength=seq_len).float()
    head_means = per_distance / positions
    count = positions * values.shape[0]
    mean = per_distance.sum(0) / count
    variance = (squares.sum(0) / count - mean**2).clamp_min(0) * count / (count - 1).clamp_min(1)
    head_spread = head_means.std(0) if values.shape[0] > 1 else torch.zeros(seq_len)
    return DistanceProfile(mean, variance.sqrt(), head_spread, count)


def rank_of(means: torch.Tensor, distance: int = 0) -> float:
    """Rank of ``distance`` among all distances by mean importance: 1 = least important (ties share the mean
    rank)."""
    below = int((means < means[distance]).sum())
    ties = int((means == means[distance]).sum())
    return below + (ties + 1) / 2


def rank_interval(
    importance: torch.Tensor, distance: int = 0, draws: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(rank, low, high) of ``distance``: its rank by mean importance (:func:`rank_of`) and the ``level`` interval
    of that rank when every distance's (head, position) values are resampled with replacement (a bootstrap)."""
    values, distance_of = _by_distance(importance)
    seq_len = importance.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    groups = [values[:, distance_of == d].flatten() for d in range(seq_len)]
    ranks = []
    for _ in range(draws):
        means = torch.stack([g[torch.randint(len(g), (len(g),), generator=generator)].mean() for g in groups])
        ranks.append(rank_of(means, distance))
    ranked = torch.tensor(ranks)
    tail = (1 - level) / 2
    low, high = torch.quantile(ranked, torch.tensor([tail, 1 - tail])).tolist()
    return rank_of(distance_profile(importance).mean, distance), low, high


def across_runs(profiles: list[DistanceProfile]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) over runs of their mean importance at each distance (0 with one run)."""
    means = torch.stack([p.mean for p in profiles])
    return means.mean(0), means.std(0) if len(profiles) > 1 else torch.zeros_like(means[0])


def runs_figure(runs: dict[str, list[DistanceProfile]], title: str) -> Figure:
    """Mean importance by distance of each group of runs (e.g. a recipe's seeds), with a band of ± the spread
    across its runs and a lighter one of ± the mean spread across heads and positions within a run."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for label, profiles in runs.items():
        mean, between = across_runs(profiles)
        within = torch.stack([p.spread for p in profiles]).mean(0)
        x = torch.arange(len(mean)).numpy()
        (line,) = ax.plot(x, mean.numpy(), label=f"{label} ({len(profiles)} runs)", linewidth=1.4)
        ax.fill_between(
            x, (mean - within).numpy(), (mean + within).numpy(), color=line.get_color(), alpha=0.08
        )
        ax.fill_between(
            x, (mean - between).numpy(), (mean + between).numpy(), color=line.get_color(), alpha=0.3
        )
    ax.axhline(0.5, color="#888", linestyle="--", linewidth=0.8)
    ax.set_xlabel("distance |i − j| between query and key (0 = diagonal)")
    ax.set_ylabel("mean importance σ(α)")
    ax.set_ylim(0, 1)
    ax.set_title(title + "\n(dark band: ± std across runs; light: ± std across heads and positions)")
    ax.legend(loc="best")
    return fig


def save_runs_figure(runs: dict[str, list[DistanceProfile]], path: Path, title: str) -> Path:
    """:func:`runs_figure` saved to ``path``."""
    fig = runs_figure(runs, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
