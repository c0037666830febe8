"""Run an evaluation: every checkpoint × task × learning rate × seed as a job, recorded in MLflow, summarised in
the paper's table.

Two executors run the jobs; the recording, retries and table are the same for both. On Ray (the default) each
job is a Ray task asking for one GPU when the cluster has GPUs (none on CPU), so Ray runs as many side by side
as the cluster holds. In process (``use_ray=False``, ``--no-ray``) the jobs run one after another in the
driver, on its GPU if it has one; ``ray`` is not even imported. Results are recorded as they come, first in
the output directory (``jobs/``), then in MLflow, so a crash of the driver loses nothing already finished and
``resume`` skips it. MLflow failing (down from the start, or mid-run) stops neither: the evaluation goes on,
the table is built from the results on disk (and what MLflow holds), and a ``resume`` with MLflow back records
what it missed. A failed attempt is recorded (FAILED nested run with the traceback) and run again up to
``max_retries`` times; jobs that still fail are reported and the table is built from the others.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from eval.jobs import DataSource, FinetuneConfig, Job, evaluation_key, expand_jobs, recipe
from eval.table import JobRecord, TableRow, render_csv, render_markdown, render_selection_csv, select
from eval.tasks import TASKS, TaskSpec
from eval.tracking import CHECKPOINT, LocalResults, Recorder

log = logging.getLogger("eval")


def parse_fail_spec(spec: str | None) -> dict[str, int]:
    """The ``eval_fail`` fault: ``"rte"`` (every attempt fails) or ``"rte:1,cola:2"`` (the first N attempts
    fail) -> {task: N}. It drives the real failure path (job error -> retry -> report); nothing is mocked."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        task, _, n = part.partition(":")
        out[task] = int(n) if n else 1_000_000
    return out


def _job_entry(job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> dict[str, Any]:
    """What a job runs. ``task`` and ``fail_attempts`` come from the driver: a Ray worker on another node
    shares neither its registry (a task registered at run time) nor its environment (the fault switch).
    Imports here so the recorded interval includes a Ray worker's import time."""
    start = time.time()
    from eval.finetune import run_job

    result = run_job(job, attempt, task, fail_attempts)
    result["start_time"] = start
    return result


@dataclass
class JobFailure:
    job: Job
    attempts: int
    error: str


@dataclass
class EvalOutcome:
    rows: list[TableRow]
    failures: list[JobFailure]
    parent_run_ids: dict[str, str]  # checkpoint -> parent run id
    markdown: str
    output_dir: Path
    ran: int = 0
    skipped: int = 0
    job_runs: dict[str, list[str]] = field(default_factory=dict)  # job key -> nested run ids, all attempts
    # Why MLflow holds only part of the evaluation (MLflow failed; every finished job is in output_dir/jobs/)
    tracking_error: str | None = None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]


def _describe_local(exc: BaseException) -> tuple[str, str]:
    """A one-line error and the full traceback for the record."""
    return _one_line(exc), "".join(traceback.format_exception(exc))


def _describe_ray(exc: BaseException) -> tuple[str, str]:
    """Like :func:`_describe_local`, naming the job's own exception when Ray wrapped it."""
    import ray

    details = "".join(traceback.format_exception(exc))
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if cause is None or isinstance(cause, ray.exceptions.RayError):
        # Not the job's own exception (it could not be shipped back, or Ray itself failed): the last line of
        # the (remote) traceback still names it.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return (lines[-1] if lines else type(exc).__name__)[:1000], details
    return _one_line(cause), details


@dataclass
class _Done:
    """One finished attempt: the job as it ran, and its result or its error (one line, full text)."""

    job: Job
    attempt: int
    result: dict[str, Any] | None = None
    error: str = ""
    details: str = ""


class _Executor(Protocol):
    """Runs job attempts and hands back each as it finishes; what differs between Ray and in-process."""

    tags: dict[str, str]  # recorded on every finished nested run

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        """Start (or queue) :func:`_job_entry` with these arguments."""

    def pending(self) -> int: ...

    def next_done(self) -> _Done: ...

    def close(self) -> None: ...


class _InProcess:
    """Runs the jobs one after another in this process, on its GPU if torch sees one (``--no-ray``)."""

    def __init__(self) -> None:
        self.tags = {"sparsebert.executor": "in-process"}
        self._queue: deque[tuple[Job, int, TaskSpec, int]] = deque()
        log.info("running in this process, one job at a time")

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        self._queue.append((job, attempt, task, fail_attempts))  # a retry goes to the back, as on Ray

    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> _Done:
        job, attempt, task, fail_attempts = self._queue.popleft()
        try:
            return _Done(job, attempt, _job_entry(job, attempt, task, fail_attempts))
        except Exception as exc:  # KeyboardInterrupt passes: the run is marked KILLED and can be resumed
            return _Done(job, attempt, None, *_describe_local(exc))
        finally:
            _free_accelerator()

    def close(self) -> None:
        pass


def _free_accelerator() -> None:
    """Give the next job the whole GPU: a failed job's traceback frames can keep its model alive in a cycle."""
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch here: the driver stays light until a job runs
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class _OnRay:
    """Runs every job as a Ray task (side by side as the cluster allows); starts or joins Ray."""

    def __init__(
        self, address: str | None, cpus_per_job: float, gpus_per_job: float | None, device: str
    ) -> None:
        import ray

        self._ray = ray
        self._started = _start_ray(address)
        self._pending: dict[Any, tuple[Job, int]] = {}
        try:
            gpus = gpus_per_job
            if gpus is None:  # a job forced onto the CPU need not hold a GPU
                gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
            self.gpus = gpus
            self.tags = {"sparsebert.executor": "ray", "ray.num_gpus": str(gpus)}
            self._remote = ray.remote(_job_entry).options(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)
            log.info("running on Ray: %s, %s GPU per job", ray.cluster_resources(), gpus)
        except BaseException:
            self.close()
            raise

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        job = device_for_ray(job, self.gpus)
        self._pending[self._remote.remote(job, attempt, task, fail_attempts)] = (job, attempt)

    def pending(self) -> int:
        return len(self._pending)

    def next_done(self) -> _Done:
        (ref,), _ = self._ray.wait(list(self._pending), num_returns=1)
        job, attempt = self._pending.pop(ref)
        try:
            return _Done(job, attempt, self._ray.get(ref))
        except Exception as exc:  # a job's own error, a crashed worker, a lost node: all retried
            return _Done(job, attempt, None, *_describe_ray(exc))

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def device_for_ray(job: Job, gpus: float) -> Job:
    """A job given GPUs by Ray must use one: ``auto`` becomes ``cuda``, so a worker that cannot see its GPU
    fails loudly instead of training on the CPU. ``cpu`` and ``cuda`` are left as asked."""
    if gpus > 0 and job.config.device == "auto":
        return replace(job, config=replace(job.config, device="cuda"))
    return job


def _start_ray(address: str | None) -> bool:
    """Connect to (``address``) or start a local Ray unless one is already up; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=True)
    return True


def run_evaluation(
    checkpoints: list[str],
    tasks: list[str],
    lrs: list[float],
    seeds: list[int],
    config: FinetuneConfig | None = None,
    data: DataSource | None = None,
    *,
    experiment: str = "sparsebert-eval",
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    max_retries: int = 1,
    resume: bool = False,
    output_dir: str | Path = "eval_results",
    labels: list[str] | None = None,
    cpus_per_job: float = 1,
    gpus_per_job: float | None = None,
    use_ray: bool = True,
) -> EvalOutcome:
    """Fine-tune and evaluate every job, record it in ``output_dir/jobs/`` and in MLflow, and write the results
    table to ``output_dir``. MLflow failing does not stop the evaluation (see :class:`eval.tracking.Recorder`).

    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``).
    ``use_ray=False`` runs the jobs one after another in this process (``ray_address``, ``cpus_per_job`` and
    ``gpus_per_job`` are then unused). On Ray, ``gpus_per_job`` defaults to 1 when the cluster has GPUs (and
    the device is not ``cpu``), else 0.
    """
    config, data = config or FinetuneConfig(), data or DataSource()
    if labels is not None and len(labels) != len(checkpoints):
        raise ValueError("give one label per checkpoint")
    if unknown := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; registered: {', '.join(TASKS)}")
    jobs = expand_jobs(checkpoints, tasks, lrs, seeds, config, data)
    from sparsebert.faults import fault  # here: the sparsebert package imports torch

    # The fault switch is read once, by the driver: Ray workers may not see its environment.
    fail = parse_fail_spec(fault("eval_fail"))
    if not jobs:
        raise ValueError("nothing to run: give at least one checkpoint, task, learning rate and seed")
    tracker = Recorder(experiment, tracking_uri)
    output_dir = Path(output_dir)
    local = LocalResults(output_dir / "jobs")
    rows, parents, keys, recorded, done = _open_parents(
        tracker, local, jobs, tasks, lrs, seeds, labels, resume
    )
    todo = [j for j in jobs if (j.checkpoint, j.key) not in done]
    log.info("%d jobs: %d to run, %d already recorded", len(jobs), len(todo), len(jobs) - len(todo))
    failures: list[JobFailure] = []
    job_runs: dict[str, list[str]] = {}
    try:
        if todo:  # Ray is only started when there is something to run
            executor: _Executor = (
                _OnRay(ray_address, cpus_per_job, gpus_per_job, config.device) if use_ray else _InProcess()
            )
            try:
                failures, job_runs = _run_jobs(
                    tracker, local, keys, todo, parents, rows, executor, max_retries, fail
                )
            finally:
                executor.close()
    except BaseException:
        for parent in parents.values():  # interrupted: say so; --resume picks the parents up again
            tracker.end(parent, "KILLED")
        raise

    # The table is built from the results on disk and what MLflow holds (jobs recorded from another output
    # directory), so resumed and fresh jobs are summarised alike.
    for ckpt, row in rows.items():
        parent = parents.get(ckpt)
        in_mlflow = tracker.finished_jobs(parent) if parent else None
        finished = {**(recorded[ckpt] if in_mlflow is None else in_mlflow), **local.records(keys[ckpt])}
        row.summaries = select(list(finished.values()))
        summary = {f"{t}/{m}": v for t, s in row.summaries.items() for m, v in s.metrics.items()}
        summary.update({f"{t}/best_lr": s.lr for t, s in row.summaries.items()})
        if parent:
            tracker.log_metrics(parent, summary)
    table = list(rows.values())
    files = {
        "results.md": render_markdown(table),
        "results.csv": render_csv(table),
        "selection.csv": render_selection_csv(table),
    }
    if failures:
        files["failed_jobs.txt"] = "".join(
            f"{f.job.checkpoint}\t{f.job.key}\t{f.attempts}\t{f.error}\n" for f in failures
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "failed_jobs.txt").unlink(missing_ok=True)  # a previous run's list is stale now
    for name, text in files.items():
        (output_dir / name).write_text(text)
    for ckpt, parent in parents.items():
        tracker.log_files(parent, files)
        tracker.close_parent(parent, failed=any(f.job.checkpoint == ckpt for f in failures))
    if tracker.error:
        log.warning(
            "MLflow holds only part of this evaluation (%s); every finished job is in %s. Run the same command "
            "with --resume once MLflow is back: it records them there without running them again",
            tracker.error,
            local.root,
        )
    return EvalOutcome(
        table, failures, parents, files["results.md"], output_dir, len(todo), len(jobs) - len(todo), job_runs,
        tracker.error,
    )  # fmt: skip


def _open_parents(
    tracker: Recorder,
    local: LocalResults,
    jobs: list[Job],
    tasks: list[str],
    lrs: list[float],
    seeds: list[int],
    labels: list[str] | None,
    resume: bool,
) -> tuple[
    dict[str, TableRow], dict[str, str], dict[str, str], dict[str, dict[str, JobRecord]], set[tuple[str, str]]
]:
    """One parent run per checkpoint (a row of the table), when MLflow answers. Returns the rows, the parent
    run ids, the evaluation keys, the finished jobs MLflow holds and, with ``resume``, the finished jobs to skip
    (on disk or in MLflow; those only on disk are recorded in MLflow now). Without ``resume``, results an
    earlier evaluation left on disk are set aside."""
    from eval.model_loading import mask_label, mask_sparsity, pretrain_run_id

    config, data = jobs[0].config, jobs[0].data
    rows: dict[str, TableRow] = {}
    parents: dict[str, str] = {}
    keys: dict[str, str] = {}
    recorded: dict[str, dict[str, JobRecord]] = {}
    done: set[tuple[str, str]] = set()
    for i, ckpt in enumerate(dict.fromkeys(j.checkpoint for j in jobs)):
        # Loading the model first also checks the checkpoint before anything is recorded.
        sparsity = mask_sparsity(
            ckpt,
            config.max_seq_len,
            config.attention_pattern,
            config.attention_backend,
            config.trust_remote_code,
        )
        label = labels[i] if labels else mask_label(ckpt, config.attention_pattern)
        tags = {CHECKPOINT: ckpt, "sparsebert.mask": label, "sparsebert.tasks": ",".join(tasks),
                "sparsebert.lrs": ",".join(f"{x:g}" for x in lrs), "sparsebert.seeds": ",".join(map(str, seeds))}  # fmt: skip
        if run_id := pretrain_run_id(ckpt) or tracker.find_pretrain_run(ckpt):
            tags["sparsebert.pretrain_run_id"] = run_id
        key = keys[ckpt] = evaluation_key(ckpt, config, data)
        rows[ckpt] = TableRow(label, ckpt, sparsity)
        parent, resumed = tracker.open_parent(key, f"eval {label}", tags, resume) or (None, False)
        if parent:
            parents[ckpt] = parent
            tracker.log_params(
                parent, {**recipe(config), **{f"data.{k}": v for k, v in asdict(data).items()}}
            )
            tracker.log_metrics(parent, {"mask_sparsity": sparsity})
        recorded[ckpt] = (tracker.finished_jobs(parent) or {}) if resumed else {}
        if not resume:
            local.set_aside(key)
            continue
        saved = local.load(key)
        done |= {(ckpt, k) for k in (*recorded[ckpt], *saved)}
        for job_key, entry in saved.items():
            if parent and job_key not in recorded[ckpt]:  # finished while MLflow was down: record it now
                job = Job(entry["checkpoint"], entry["task"], entry["lr"], entry["seed"],
                          replace(config, device=entry["device"]), data)  # fmt: skip
                if run_id := tracker.log_job(parent, job, entry["result"], entry["tags"]):
                    local.mark_recorded(key, job_key, parent, run_id)
    return rows, parents, keys, recorded, done


def _run_jobs(
    tracker: Recorder,
    local: LocalResults,
    keys: dict[str, str],
    todo: list[Job],
    parents: dict[str, str],
    rows: dict[str, TableRow],
    executor: _Executor,
    max_retries: int,
    fail: dict[str, int],
) -> tuple[list[JobFailure], dict[str, list[str]]]:
    """Run every job, record each attempt as it finishes (a result on disk first, then in MLflow), run failures
    again; returns those still failing.

    ``fail`` is the parsed ``eval_fail`` fault: {task: attempts made to fail}."""
    failures: list[JobFailure] = []
    job_runs: dict[str, list[str]] = {}

    def submit(job: Job, attempt: int) -> None:
        executor.submit(job, attempt, TASKS[job.task], fail.get(job.task, 0))

    for job in todo:
        submit(job, 1)
    while executor.pending():
        done = executor.next_done()
        job, attempt = done.job, done.attempt
        parent, name = parents.get(job.checkpoint), f"[{rows[job.checkpoint].label}] {job.key}"
        runs = job_runs.setdefault(f"{job.checkpoint}::{job.key}", [])
        if done.result is None:
            if parent and (
                run_id := tracker.log_failed_attempt(parent, job, attempt, done.error, done.details)
            ):
                runs.append(run_id)
            if attempt <= max_retries:
                log.warning("%s failed (attempt %d): %s; retrying", name, attempt, done.error)
                submit(job, attempt + 1)
            else:
                log.error("%s failed after %d attempts: %s", name, attempt, done.error)
                failures.append(JobFailure(job, attempt, done.error))
            continue
        local.save(keys[job.checkpoint], job, done.result, executor.tags)
        if parent and (run_id := tracker.log_job(parent, job, done.result, executor.tags)):
            local.mark_recorded(keys[job.checkpoint], job.key, parent, run_id)
            runs.append(run_id)
        log.info("%s done on %s: %s", name, done.result["device"], _brief(done.result["metrics"]))
    return failures, job_runs


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())[:6])
