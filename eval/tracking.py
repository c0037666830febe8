"""Records of an evaluation: in MLflow, a parent run per checkpoint and a nested run per job attempt; on disk,
every finished job's result (:class:`LocalResults`), written before MLflow hears of it.

Only the driver writes to MLflow; jobs return their results. A ``sqlite:///`` or ``./mlruns`` store on the
machine that runs the driver is unreachable from other nodes of a Ray cluster, and a single writer avoids
sqlite lock contention, so this works with any tracking URI. Nested runs still carry the jobs' own start and
end times. MLflow failing never stops an evaluation (:class:`Recorder`): the results on disk are enough for
the table and for ``--resume``, which also records them in MLflow once it is back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.jobs import Job, job_params
from eval.table import JobRecord
from sparsebert.track.mlflow_store import MlflowStore, brief_error, short_http_retries

log = logging.getLogger("eval")

KIND, EVAL_KEY, JOB_KEY, CHECKPOINT = (
    "sparsebert.kind",
    "sparsebert.eval_key",
    "sparsebert.job_key",
    "sparsebert.train.checkpoint",
)
PARENT = "mlflow.parentRunId"


class Tracker(MlflowStore):
    """An evaluation's records, written through the project's MLflow layer (explicit run ids: nothing leaks
    between evaluations in one process)."""

    def open_parent(
        self, eval_key: str, run_name: str, tags: dict[str, str], resume: bool
    ) -> tuple[str, bool]:
        """The parent run of one checkpoint's evaluation: with ``resume``, the latest one with the same key."""
        if resume:
            run_id = self.latest(f"tags.`{EVAL_KEY}` = '{eval_key}' and tags.`{KIND}` = 'evaluation'")
            if run_id:
                self.reopen(run_id)
                self.set_tags(run_id, tags)
                return run_id, True
        return self.create_run(run_name, {**tags, KIND: "evaluation", EVAL_KEY: eval_key}), False

    def _job_run(
        self, parent_id: str, job: Job, attempt: int, start: float, extra_tags: dict[str, str]
    ) -> str:
        tags = {PARENT: parent_id, KIND: "job", JOB_KEY: job.key, "task": job.task, "attempt": str(attempt)}
        name = f"{job.task} lr={job.lr:g} seed={job.seed}" + (f" (attempt {attempt})" if attempt > 1 else "")
        run_id = self.create_run(name, {**tags, **extra_tags}, start_time=start)
        self.log_params(run_id, job_params(job))
        return run_id

    def log_job(
        self, parent_id: str, job: Job, result: dict[str, Any], tags: dict[str, str] | None = None
    ) -> str:
        """A finished job: params, dev metrics, the loss curve, timing; the dev predictions as artifacts."""
        tags = {"device": result["device"], "host": result["host"], **(tags or {})}
        run_id = self._job_run(parent_id, job, result["attempt"], result["start_time"], tags)
        values = [(k, v, 0) for k, v in result["metrics"].items()]
        values += [("train_loss", loss, int(step)) for step, loss in result["loss_history"]]
        values += [
            ("train_steps", result["steps"], 0),
            ("train_examples", result["train_examples"], 0),
            ("eval_examples", result["eval_examples"], 0),
            ("duration_s", result["end_time"] - result["start_time"], 0),
        ]
        self.log_metric_series(run_id, values, timestamp=result["end_time"])
        for name, payload in result.get("artifacts", {}).items():
            self.log_dict(run_id, payload, name)
        self.end(run_id, "FINISHED", end_time=result["end_time"])
        return run_id

    def log_failed_attempt(self, parent_id: str, job: Job, attempt: int, error: str, details: str) -> str:
        """A failed attempt stays visible as a FAILED nested run with the error and its traceback."""
        run_id = self._job_run(parent_id, job, attempt, time.time(), {"error": error[:4000]})
        self.log_text(run_id, details, "error.txt")
        self.end(run_id, "FAILED")
        return run_id

    def finished_jobs(self, parent_id: str) -> dict[str, JobRecord]:
        """The FINISHED nested runs of a parent, by job key (the latest one wins if a key appears twice)."""
        query = f"tags.`{PARENT}` = '{parent_id}' and attributes.status = 'FINISHED'"
        out = {}
        for run in self.search(query, order_by=["attributes.start_time ASC"]):
            p = run.data.params
            metrics = {k: v for k, v in run.data.metrics.items() if k not in _BOOKKEEPING}
            out[run.data.tags[JOB_KEY]] = JobRecord(p["task"], float(p["lr"]), int(p["seed"]), metrics)
        return out

    def find_pretrain_run(self, checkpoint: str) -> str | None:
        """The pre-training run that exported ``checkpoint`` (tagged ``final_model_dir``), if in this store."""
        if "'" in checkpoint:
            return None  # cannot be quoted in a filter string
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        return self.latest(f"tags.final_model_dir = '{checkpoint}'", experiments)

    def log_files(self, run_id: str, files: dict[str, str]) -> None:
        for name, text in files.items():
            self.log_text(run_id, text, name)

    def close_parent(self, run_id: str, failed: bool) -> None:
        self.end(run_id, "FAILED" if failed else "FINISHED")


_BOOKKEEPING = {"train_loss", "train_steps", "train_examples", "eval_examples", "duration_s"}


class Recorder:
    """A :class:`Tracker` whose failures never stop the evaluation: the first one (MLflow unreachable, or
    failing mid-run) is logged once as a warning, and from then on every call does nothing and returns None,
    without waiting on the server again. MLflow's HTTP retries are kept short
    (:func:`sparsebert.track.mlflow_store.short_http_retries`)."""

    def __init__(self, experiment: str, uri: str | None = None):
        short_http_retries()
        self.error: str | None = None
        self._tracker: Tracker | None = None
        self._tracker = self._guard("connecting", lambda: Tracker(experiment, uri))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """Every :class:`Tracker` method, guarded."""
        method = getattr(Tracker, name)
        if not callable(method) or name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._guard(
            name, lambda: getattr(self._tracker, name)(*args, **kwargs)
        )

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        if self.error is not None:
            return None
        try:
            return call()
        except Exception as exc:  # whatever MLflow raises: the evaluation goes on without it
            self.error = brief_error(exc)
            log.warning(
                "MLflow failed (%s: %s); the evaluation continues without it. Finished jobs are kept in the "
                "output directory (jobs/); run the same command with --resume once MLflow is back to record "
                "them there (nothing is rerun)",
                what,
                self.error,
            )
            return None


class LocalResults:
    """Every finished job's result on disk, ``<output>/jobs/<evaluation key>/<job key>.json`` (the evaluation key
    is :func:`eval.jobs.evaluation_key`: checkpoint, recipe and data), written before MLflow records it and
    marked with the MLflow runs once it has. Enough to build the table and to ``--resume`` without MLflow."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def directory(self, eval_key: str) -> Path:
        return self.root / eval_key

    def path(self, eval_key: str, job_key: str) -> Path:
        return self.directory(eval_key) / f"{job_key.replace('/', '__')}.json"

    def save(self, eval_key: str, job: Job, result: dict[str, Any], tags: dict[str, str]) -> None:
        entry = {
            "job_key": job.key, "checkpoint": job.checkpoint, "task": job.task, "lr": job.lr, "seed": job.seed,
            "device": job.config.device, "tags": tags, "result": result, "mlflow": None,
        }  # fmt: skip
        self._write(self.path(eval_key, job.key), entry)

    def mark_recorded(self, eval_key: str, job_key: str, parent_id: str, run_id: str) -> None:
        path = self.path(eval_key, job_key)
        entry = json.loads(path.read_text())
        entry["mlflow"] = {"parent_run_id": parent_id, "run_id": run_id}
        self._write(path, entry)

    def load(self, eval_key: str) -> dict[str, dict[str, Any]]:
        """Job key → its saved entry."""
        directory = self.directory(eval_key)
        entries = (
            [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
            if directory.is_dir()
            else []
        )
        return {e["job_key"]: e for e in entries}

    def records(self, eval_key: str) -> dict[str, JobRecord]:
        return {
            key: JobRecord(e["task"], float(e["lr"]), int(e["seed"]), e["result"]["metrics"])
            for key, e in self.load(eval_key).items()
        }

    def set_aside(self, eval_key: str) -> None:
        """A fresh (not resumed) evaluation: an earlier one's results move to ``<key>.<time>``, out of its table."""
        directory = self.directory(eval_key)
        if directory.is_dir() and any(directory.iterdir()):
            directory.rename(
                directory.with_name(f"{eval_key}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
            )

    @staticmethod
    def _write(path: Path, entry: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entry, indent=1, default=_plain))
        os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON for what a job may return besides plain Python: numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
