"""MLflow for pre-training: rank 0 talks to the tracking store, every other rank stays silent."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from sparsebert import mask_plots

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working dir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "attention_pattern":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class RunTracker:
    """One MLflow run per training run; a resumed training run continues the same MLflow run.

    On ranks other than 0 (or with ``mlflow.enabled: false``) every method does nothing, so the train
    loop needs no ``if rank == 0``.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None

    def start(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        resume_run_id: str | None,
        params: dict[str, Any],
    ) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(uri))
        mlflow.set_experiment(experiment)
        if resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id)
        else:
            run = mlflow.start_run(run_name=run_name)
            mlflow.log_params(params)
        self.run_id = run.info.run_id

    def log_configs(self, config: dict[str, Any], ds: dict[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config/train.yaml")
        mlflow.log_text(json.dumps(ds, indent=2), "config/deepspeed.json")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)

    def log_mask(self, name: str, mask: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """The mask ``[layers, heads, L, L]`` as a safetensors file and heatmaps; DAM importance plots too."""
        if not self.enabled:
            return
        import mlflow

        mask = mask.cpu()  # files and plots are made on the host, whatever device the model runs on
        importance = importance.cpu() if importance is not None else None
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            tensors = {"mask": mask.to(torch.uint8).contiguous()}
            if importance is not None:
                tensors["importance"] = importance.float().contiguous()
            save_file(tensors, out / "mask.safetensors")
            for layer in _distinct_layers(mask):
                mask_plots.head_heatmaps(
                    mask[layer], out / f"mask_layer{layer}.png", f"{name}: layer {layer}"
                )
            if importance is not None:
                mask_plots.head_heatmaps(
                    importance[0], out / "importance_layer0.png", f"{name}: σ(α), layer 0"
                )
                mask_plots.importance_by_distance(
                    importance[0], out / "importance_by_distance.png", f"{name}: importance by distance"
                )
            mlflow.log_artifacts(str(out), artifact_path=f"masks/{name}")

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            import mlflow

            mlflow.end_run(status=status)


def _distinct_layers(mask: torch.Tensor) -> list[int]:
    """Layers whose mask differs from the previous one (a shared mask is drawn once)."""
    return [i for i in range(mask.shape[0]) if i == 0 or not torch.equal(mask[i], mask[i - 1])]
