"""MLflow: the project's one layer over it (:class:`MlflowStore`), and pre-training's run on rank 0 (:class:`RunTracker`)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
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


class MlflowStore:
    """The project's one layer over MLflow: an experiment of a tracking store, written through
    :class:`mlflow.MlflowClient` with explicit run ids (no global active run, so nothing leaks between runs or
    evaluations in one process). Pre-training (:class:`RunTracker`) and the evaluation driver
    (``eval.tracking``) both write through it."""

    def __init__(self, experiment: str, uri: str | None = None):
        from mlflow import MlflowClient  # mlflow is imported only where something is recorded

        self.client = MlflowClient(tracking_uri(uri))
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def create_run(
        self, run_name: str, tags: dict[str, Any] | None = None, start_time: float | None = None
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            start_time=None if start_time is None else _ms(start_time),
            tags={k: str(v) for k, v in (tags or {}).items()},
            run_name=run_name,
        )
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a run running again (a resumed training run, a resumed evaluation)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: float | None = None
    ) -> None:
        self.log_metric_series(run_id, [(k, float(v), step) for k, v in metrics.items()], timestamp)

    def log_metric_series(
        self, run_id: str, values: list[tuple[str, float, int]], timestamp: float | None = None
    ) -> None:
        """``(key, value, step)`` triples in batches (log_batch takes at most 1000 metrics)."""
        from mlflow.entities import Metric

        now = _ms(time.time() if timestamp is None else timestamp)
        metrics = [Metric(key, float(value), now, int(step)) for key, value, step in values]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_dict(self, run_id: str, payload: Any, path: str) -> None:
        self.client.log_dict(run_id, payload, path)

    def log_artifacts(self, run_id: str, local_dir: str | Path, path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), path)

    def end(self, run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        self.client.set_terminated(run_id, status, end_time=None if end_time is None else _ms(end_time))

    def latest(self, query: str, experiments: list[str] | None = None) -> str | None:
        """The id of the newest run matching ``query`` in this experiment (or in ``experiments``), or None."""
        found = self.client.search_runs(
            experiments or [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        return found[0].info.run_id if found else None

    def search(self, query: str, order_by: list[str] | None = None, experiments: list[str] | None = None):
        """Every run of this experiment (or of ``experiments``) matching ``query``, page after page."""
        token = None
        while True:
            page = self.client.search_runs(
                experiments or [self.experiment_id], query, order_by=order_by, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RunTracker:
    """One MLflow run per training run; a resumed training run continues the same MLflow run.

    On ranks other than 0 (or with ``mlflow.enabled: false``) every method does nothing, so the train
    loop needs no ``if rank == 0``.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self.store: MlflowStore | None = None

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
        self.store = MlflowStore(experiment, uri)
        if resume_run_id:
            self.store.reopen(resume_run_id)
            self.run_id = resume_run_id
        else:
            self.run_id = self.store.create_run(run_name)
            self.store.log_params(self.run_id, params)

    def log_configs(self, config: dict[str, Any], ds: dict[str, Any]) -> None:
        if self.enabled:
            self.store.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config/train.yaml")
            self.store.log_text(self.run_id, json.dumps(ds, indent=2), "config/deepspeed.json")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self.store.log_params(self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self.store.log_metrics(self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self.store.set_tags(self.run_id, tags)

    def log_mask(self, name: str, mask: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """The mask ``[layers, heads, L, L]`` as a safetensors file and heatmaps; DAM importance plots too."""
        if not self.enabled:
            return
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
            self.store.log_artifacts(self.run_id, out, f"masks/{name}")

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.store.end(self.run_id, status)


def _distinct_layers(mask: torch.Tensor) -> list[int]:
    """Layers whose mask differs from the previous one (a shared mask is drawn once)."""
    return [i for i in range(mask.shape[0]) if i == 0 or not torch.equal(mask[i], mask[i - 1])]
