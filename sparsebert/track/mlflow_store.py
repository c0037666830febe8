"""The project's one layer over MLflow: :class:`MlflowStore` (explicit run ids over ``MlflowClient``), the
tracking URI rule, and MLflow's HTTP retries kept short. Pre-training's tracker, its resync and the evaluation
driver all write through it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# The experiment tag MLflow 3's UI reads to show an experiment as model training ("Machine learning": runs, charts,
# artifacts) rather than a GenAI app (traces, "Evaluations"); the values are those its UI offers.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# MLflow's own HTTP retries (mlflow.environment_variables; defaults 7 retries with backoff factor 2 and a 120 s
# timeout, minutes per call against a dead server) made short; a value already in the environment wins.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working dir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def short_http_retries() -> None:
    """Bound how long one MLflow call may take against an unreachable server (:data:`HTTP_RETRY_DEFAULTS`,
    read by MLflow at each request); variables already set are left as they are."""
    for name, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def brief_error(exc: BaseException, most: int = 400) -> str:
    """An exception in one line of at most ``most`` characters, its end kept (where MLflow's HTTP errors name
    the cause, e.g. ``Connection refused``)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= most else f"{text[: most // 2 - 2]} … {text[-(most // 2 - 3) :]}"


class MlflowStore:
    """The project's one layer over MLflow: an experiment of a tracking store, written through
    :class:`mlflow.MlflowClient` with explicit run ids (no global active run, so nothing leaks between runs or
    evaluations in one process). Pre-training (:class:`RunTracker`) and the evaluation driver
    (``eval.tracking``) both write through it. The experiment is marked as model training
    (:data:`EXPERIMENT_KIND_TAG`) when created, or when found without a kind."""

    def __init__(self, experiment: str, uri: str | None = None):
        from mlflow import MlflowClient  # mlflow is imported only where something is recorded

        self.client = MlflowClient(tracking_uri(uri))
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            kind = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            self.experiment_id = self.client.create_experiment(experiment, tags=kind)
        else:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # a kind the user chose stays
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)

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
        """``(key, value, step)`` triples, all at ``timestamp`` (default: now)."""
        now = time.time() if timestamp is None else timestamp
        self.log_metric_points(run_id, [(key, value, step, now) for key, value, step in values])

    def log_metric_points(self, run_id: str, points: list[tuple[str, float, int, float]]) -> None:
        """``(key, value, step, timestamp)`` points in batches (log_batch takes at most 1000 metrics). A SQL-backed
        store keeps one copy of a point logged twice with the same key, value, step and timestamp."""
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), _ms(at), int(step)) for key, value, step, at in points]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_dict(self, run_id: str, payload: Any, path: str) -> None:
        self.client.log_dict(run_id, payload, path)

    def log_artifacts(self, run_id: str, local_dir: str | Path, path: str) -> None:
        self.client.log_artifacts(run_id, str(local_dir), path)

    def log_artifact(self, run_id: str, local_file: str | Path, path: str | None) -> None:
        self.client.log_artifact(run_id, str(local_file), path or None)

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
