"""DAM importance σ(α) summarised by distance |i − j|: the profile a search snapshot records
(``dam.snapshot_every``) and its three bands, the diagonal (|i − j| = 0), the near band (1 ≤ |i − j| ≤ L/16) and the
far band (the rest). Whether the diagonal falls first, as the paper found, reads off these curves over steps.

A snapshot is a safetensors file ``importance/step_<step>.safetensors`` among the run's tracking artifacts
(``output_dir/tracking/artifacts/`` and the MLflow run) holding ``profile`` ``[layers, heads, L]``, the mean σ(α)
at each distance per layer and head; the bands are also logged as the metrics ``importance/diagonal``,
``importance/near`` and ``importance/far``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sparsebert.model.masks import distance_matrix

SNAPSHOT_DIR = "importance"  # the artifact path of the snapshots
_SNAPSHOT = re.compile(r"^step_(\d+)\.safetensors$")
BANDS = ("diagonal", "near", "far")


def near_width(seq_len: int) -> int:
    """The near band's widest distance: L/16 (8 at L = 128), at least 1."""
    return max(1, seq_len // 16)


def by_distance(importance: torch.Tensor) -> torch.Tensor:
    """``[..., L, L]`` → ``[..., L]``: the mean over the positions at each distance |i − j|."""
    seq_len = importance.shape[-1]
    distance = distance_matrix(seq_len, torch.device("cpu")).flatten()
    counts = torch.bincount(distance, minlength=seq_len).float()
    flat = importance.detach().float().cpu().flatten(-2)
    sums = torch.zeros(*flat.shape[:-1], seq_len).index_add_(-1, distance, flat)
    return sums / counts


def bands(profile: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three bands of a profile ``[..., L]`` (each the mean σ(α) over the positions of its distances, so a
    distance weighs by how many positions lie at it): ``[...]`` each."""
    seq_len = profile.shape[-1]
    weights = torch.tensor([float(seq_len - d) * (1 if d == 0 else 2) for d in range(seq_len)])
    near = near_width(seq_len)
    spans = {"diagonal": slice(0, 1), "near": slice(1, near + 1), "far": slice(near + 1, seq_len)}
    out = {}
    for name, span in spans.items():
        w = weights[span]
        out[name] = (
            (profile[..., span] * w).sum(-1) / w.sum()
            if w.numel()
            else torch.full(profile.shape[:-1], float("nan"))
        )
    return out


def snapshot_name(step: int) -> str:
    return f"step_{step:07d}.safetensors"


def read_snapshots(directory: str | Path) -> list[tuple[int, torch.Tensor]]:
    """(step, profile ``[layers, heads, L]``) of every snapshot in ``directory``, by step."""
    from safetensors.torch import load_file

    directory = Path(directory)
    found = []
    for path in directory.glob("step_*.safetensors") if directory.is_dir() else []:
        match = _SNAPSHOT.match(path.name)
        if match:
            found.append((int(match.group(1)), load_file(path)["profile"]))
    return sorted(found, key=lambda item: item[0])
