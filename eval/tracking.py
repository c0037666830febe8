"""MLflow records of an evaluation: a parent run per checkpoint, a nested run per job attempt.

Only the driver writes to MLflow; jobs return their results. A ``sqlite:///`` or ``./mlruns`` store on the
machine that runs the driver is unreachable from other nodes of a Ray cluster, and a single writer avoids
sqlite lock contention, so this works with any tracking URI. Nested runs still carry the jobs' own start and
end times.
"""

from __future__ import annotations

import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from eval.jobs import Job, job_params
from eval.table import JobRecord

KIND, EVAL_KEY, JOB_KEY, CHECKPOINT = (
    "sparsebert.kind",
    "sparsebert.eval_key",
    "sparsebert.job_key",
    "sparsebert.checkpoint",
)
PARENT = "mlflow.parentRunId"


def _ms(t: float) -> int:
    return int(t * 1000)


class Tracker:
    """Thin layer over :class:`MlflowClient` (no global active run, so nothing leaks between evaluations)."""

    def __init__(self, experiment: str, tracking_uri: str | None = None):
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def open_parent(
        self, eval_key: str, run_name: str, tags: dict[str, str], resume: bool
    ) -> tuple[str, bool]:
        """The parent run of one checkpoint's evaluation: with ``resume``, the latest one with the same key."""
        if resume:
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{EVAL_KEY}` = '{eval_key}' and tags.`{KIND}` = 'evaluation'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                self._tags(run_id, tags)
                return run_id, True
        run = self.client.create_run(
            self.experiment_id, tags={**tags, KIND: "evaluation", EVAL_KEY: eval_key}, run_name=run_name
        )
        return run.info.run_id, False

    def _tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        self.client.log_batch(run_id, params=items)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = _ms(time.time())
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def _job_run(
        self, parent_id: str, job: Job, attempt: int, start: float, extra_tags: dict[str, str]
    ) -> str:
        tags = {PARENT: parent_id, KIND: "job", JOB_KEY: job.key, "task": job.task, "attempt": str(attempt)}
        name = f"{job.task} lr={job.lr:g} seed={job.seed}" + (f" (attempt {attempt})" if attempt > 1 else "")
        run = self.client.create_run(
            self.experiment_id, start_time=_ms(start), tags={**tags, **extra_tags}, run_name=name
        )
        self.log_params(run.info.run_id, job_params(job))
        return run.info.run_id

    def log_job(
        self, parent_id: str, job: Job, result: dict[str, Any], tags: dict[str, str] | None = None
    ) -> str:
        """A finished job: params, dev metrics, the loss curve, timing; SQuAD predictions as artifacts."""
        tags = {"device": result["device"], "host": result["host"], **(tags or {})}
        run_id = self._job_run(parent_id, job, result["attempt"], result["start_time"], tags)
        now = _ms(result["end_time"])
        metrics = [Metric(k, v, now, 0) for k, v in result["metrics"].items()]
        metrics += [Metric("train_loss", loss, now, int(step)) for step, loss in result["loss_history"]]
        metrics += [
            Metric("train_steps", result["steps"], now, 0),
            Metric("train_examples", result["train_examples"], now, 0),
            Metric("eval_examples", result["eval_examples"], now, 0),
            Metric("duration_s", result["end_time"] - result["start_time"], now, 0),
        ]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for name, payload in result.get("artifacts", {}).items():
            self.client.log_dict(run_id, payload, name)
        self.client.set_terminated(run_id, "FINISHED", end_time=now)
        return run_id

    def log_failed_attempt(self, parent_id: str, job: Job, attempt: int, error: str, details: str) -> str:
        """A failed attempt stays visible as a FAILED nested run with the error and its traceback."""
        run_id = self._job_run(parent_id, job, attempt, time.time(), {"error": error[:4000]})
        self.client.log_text(run_id, details, "error.txt")
        self.client.set_terminated(run_id, "FAILED")
        return run_id

    def finished_jobs(self, parent_id: str) -> dict[str, JobRecord]:
        """The FINISHED nested runs of a parent, by job key (the latest one wins if a key appears twice)."""
        query = f"tags.`{PARENT}` = '{parent_id}' and attributes.status = 'FINISHED'"
        out = {}
        for run in self._search_all(query):
            p = run.data.params
            metrics = {k: v for k, v in run.data.metrics.items() if k not in _BOOKKEEPING}
            out[run.data.tags[JOB_KEY]] = JobRecord(p["task"], float(p["lr"]), int(p["seed"]), metrics)
        return out

    def _search_all(self, query: str):
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], query, order_by=["attributes.start_time ASC"], page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def find_pretrain_run(self, checkpoint: str) -> str | None:
        """The pre-training run that exported ``checkpoint`` (tagged ``final_model_dir``), if in this store."""
        if "'" in checkpoint:
            return None  # cannot be quoted in a filter string
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        found = self.client.search_runs(
            experiments,
            f"tags.final_model_dir = '{checkpoint}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def log_files(self, run_id: str, files: dict[str, str]) -> None:
        for name, text in files.items():
            self.client.log_text(run_id, text, name)

    def close_parent(self, run_id: str, failed: bool) -> None:
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


_BOOKKEEPING = {"train_loss", "train_steps", "train_examples", "eval_examples", "duration_s"}
