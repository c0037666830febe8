"""MLflow records of an evaluation: a parent run per checkpoint, a nested run per job attempt.

Only the driver writes to MLflow; jobs return their results. A ``sqlite:///`` or ``./mlruns`` store on the
machine that runs the driver is unreachable from other nodes of a Ray cluster, and a single writer avoids
sqlite lock contention, so this works with any tracking URI. Nested runs still carry the jobs' own start and
end times.
"""

from __future__ import annotations

import time
from typing import Any

from eval.jobs import Job, job_params
from eval.table import JobRecord
from sparsebert.tracking import MlflowStore

KIND, EVAL_KEY, JOB_KEY, CHECKPOINT = (
    "sparsebert.kind",
    "sparsebert.eval_key",
    "sparsebert.job_key",
    "sparsebert.checkpoint",
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
        """A finished job: params, dev metrics, the loss curve, timing; SQuAD predictions as artifacts."""
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
