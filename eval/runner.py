"""Run an evaluation: every checkpoint × task × learning rate × seed as a job, recorded in MLflow, summarised in
the paper's table.

Two executors run the jobs (:mod:`eval.executors`: Ray tasks, or one after another in this process with
``ray: false``, ``--no-ray``); the recording, retries and table are the same for both. Results are recorded as
they come, first in the output directory (``jobs/``), then in MLflow, so a crash of the driver loses nothing
already finished and ``resume`` skips it. MLflow failing (down from the start, or mid-run) stops neither: the
evaluation goes on, the table is built from the results on disk (and what MLflow holds), and a ``resume`` with
MLflow back records what it missed. A failed attempt is recorded (FAILED nested run with the traceback) and run
again up to ``max_retries`` times; jobs that still fail are reported and the table is built from the others.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from eval import publish
from eval.executors import Executor, InProcess, OnRay
from eval.jobs import Job, evaluation_key, expand_jobs, recipe, resolve_checkpoint
from eval.options import EvalOptions
from eval.table import (
    JobRecord,
    TableRow,
    render_csv,
    render_markdown,
    render_selection_csv,
    select,
)
from eval.tasks import TASKS
from eval.tracking import CHECKPOINT, PARENT, LocalResults, Recorder

log = logging.getLogger("eval")
SELECTION = "median over seeds at the best learning rate per task"  # what the table reports


def parse_fail_spec(spec: str | None) -> dict[str, int]:
    """The ``eval_fail`` fault: ``"rte"`` (every attempt fails) or ``"rte:1,cola:2"`` (the first N attempts
    fail) -> {task: N}. It drives the real failure path (job error -> retry -> report); nothing is mocked."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        task, _, n = part.partition(":")
        out[task] = int(n) if n else 1_000_000
    return out


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
    kept: list[publish.KeptModel] = field(default_factory=list)  # fine-tuned models kept (save_models)
    hub_errors: list[str] = field(default_factory=list)  # uploads (push_to_hub) that failed


@dataclass
class _Checkpoint:
    """One checkpoint of the evaluation: its row of the table, its evaluation key (checkpoint, recipe and data),
    its parent run (None when MLflow did not answer), the finished jobs MLflow held when the evaluation was
    resumed, and the job keys that need not run again."""

    row: TableRow
    key: str
    parent: str | None
    recorded: dict[str, JobRecord] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    finished: dict[str, JobRecord] = field(default_factory=dict)  # every finished job, once summarised


def run_evaluation(options: EvalOptions) -> EvalOutcome:
    """Fine-tune and evaluate every job ``options`` names, record each in ``options.output``/jobs/ and in MLflow,
    and write the results table to ``options.output``. MLflow failing does not stop the evaluation (see
    :class:`eval.tracking.Recorder`). Raises :class:`~sparsebert.schema.ConfigError` when the options name no
    checkpoint or lack the data of a task."""
    options.check_runnable()
    jobs = expand_jobs(
        list(options.checkpoint), options.task_names, list(options.lrs), list(options.seeds), options.finetune,
        options.data,
    )  # fmt: skip
    from sparsebert.faults import fault  # here: the sparsebert package imports torch

    # The fault switch is read once, by the driver: Ray workers may not see its environment.
    fail = parse_fail_spec(fault("eval_fail"))
    tracker = Recorder(options.experiment, options.tracking_uri)
    output_dir = Path(options.output)
    local = LocalResults(output_dir / "jobs")
    checkpoints = _open_checkpoints(tracker, local, jobs, options)
    todo = [
        _keeping(job, checkpoints[job.checkpoint], options)
        for job in jobs
        if job.key not in checkpoints[job.checkpoint].done
    ]
    log.info("%d jobs: %d to run, %d already recorded", len(jobs), len(todo), len(jobs) - len(todo))
    failures, job_runs = _execute(tracker, local, checkpoints, todo, options, fail)
    table = _summarise(tracker, local, checkpoints)
    files = _write_results(tracker, checkpoints, table, failures, output_dir)
    kept, hub_errors = _publish(checkpoints, options)
    if tracker.error:
        log.warning(
            "MLflow holds only part of this evaluation (%s); every finished job is in %s. Run the same command "
            "with --resume once MLflow is back: it records them there without running them again",
            tracker.error,
            local.root,
        )
    parents = {ckpt: entry.parent for ckpt, entry in checkpoints.items() if entry.parent}
    return EvalOutcome(
        table, failures, parents, files["results.md"], output_dir, len(todo), len(jobs) - len(todo), job_runs,
        tracker.error, kept, hub_errors,
    )  # fmt: skip


def _keeping(job: Job, entry: _Checkpoint, options: EvalOptions) -> Job:
    """The job, told where to write its fine-tuned model when the evaluation keeps models."""
    if options.save_models == "none":
        return job
    return replace(job, save_to=publish.model_dir(options.output, entry.row.label, entry.key, job))


def _publish(
    checkpoints: dict[str, _Checkpoint], options: EvalOptions
) -> tuple[list[publish.KeptModel], list[str]]:
    """The kept models and their cards, their upload when asked, and each evaluated export's card updated;
    returns the kept models and the failed uploads."""
    for entry in checkpoints.values():
        if entry.row.summaries:
            try:
                publish.record_on_checkpoint(entry.row, SELECTION)
            except (
                OSError
            ) as err:  # a read-only checkpoint: its card stays as it was, the results are in output
                log.warning("the results were not added to the card of %s: %s", entry.row.checkpoint, err)
    if options.save_models == "none":
        return [], []
    rows = [(entry.row, entry.key, list(entry.finished.values())) for entry in checkpoints.values()]
    kept = publish.keep_models(options.output, rows, options.save_models)
    errors = publish.push_best(options.push_to_hub, kept) if options.push_to_hub else []
    return kept, errors


def _open_checkpoints(
    tracker: Recorder, local: LocalResults, jobs: list[Job], options: EvalOptions
) -> dict[str, _Checkpoint]:
    """Each checkpoint of ``jobs`` (resolved paths), in order, opened by :func:`_open_checkpoint`."""
    labels: dict[str, str | None] = {}
    for given, label in zip(
        options.checkpoint, options.labels or [None] * len(options.checkpoint), strict=True
    ):
        labels.setdefault(resolve_checkpoint(given), label)  # a checkpoint named twice keeps its first label
    paths = dict.fromkeys(job.checkpoint for job in jobs)
    return {path: _open_checkpoint(tracker, local, path, labels[path], options) for path in paths}


def _open_checkpoint(
    tracker: Recorder, local: LocalResults, ckpt: str, label: str | None, options: EvalOptions
) -> _Checkpoint:
    """A checkpoint's row and its parent run, when MLflow answers. With ``resume``, the finished jobs (on disk or
    in MLflow) are marked done, and those only on disk are recorded in MLflow now; without it, results an
    earlier evaluation left on disk are set aside."""
    from eval.model_loading import mask_label, mask_sparsity, pretrain_run_id

    config, data = options.finetune, options.data
    # Loading the model first also checks the checkpoint before anything is recorded.
    sparsity = mask_sparsity(
        ckpt, config.max_seq_len, config.attention_pattern, config.attention_backend, config.trust_remote_code
    )
    label = mask_label(ckpt, config.attention_pattern) if label is None else label
    tags = {CHECKPOINT: ckpt, "sparsebert.mask": label, "sparsebert.tasks": ",".join(options.task_names),
            "sparsebert.lrs": ",".join(f"{x:g}" for x in options.lrs),
            "sparsebert.seeds": ",".join(map(str, options.seeds))}  # fmt: skip
    if run_id := pretrain_run_id(ckpt) or tracker.find_pretrain_run(ckpt):
        tags["sparsebert.pretrain_run_id"] = run_id
    if options.parent_run_id:
        tags[PARENT] = options.parent_run_id
    key = evaluation_key(ckpt, config, data)
    parent, resumed = tracker.open_parent(key, f"eval {label}", tags, options.resume) or (None, False)
    if parent:
        tracker.log_params(parent, {**recipe(config), **{f"data.{k}": v for k, v in asdict(data).items()}})
        tracker.log_metrics(parent, {"mask_sparsity": sparsity})
    recorded = (tracker.finished_jobs(parent) or {}) if resumed else {}
    entry = _Checkpoint(TableRow(label, ckpt, sparsity), key, parent, recorded)
    if options.resume:
        _catch_up(tracker, local, entry, options)
    else:
        local.set_aside(key)
    return entry


def _catch_up(tracker: Recorder, local: LocalResults, entry: _Checkpoint, options: EvalOptions) -> None:
    """Resuming: every finished job (in MLflow or on disk) is done; one finished while MLflow was down is recorded
    there now."""
    saved = local.load(entry.key)
    entry.done = {*entry.recorded, *saved}
    if not entry.parent:
        return
    for job_key, item in saved.items():
        if job_key in entry.recorded:
            continue
        config = replace(options.finetune, device=item["device"])
        job = Job(item["checkpoint"], item["task"], item["lr"], item["seed"], config, options.data)
        if run_id := tracker.log_job(entry.parent, job, item["result"], item["tags"]):
            local.mark_recorded(entry.key, job_key, entry.parent, run_id)


def _execute(
    tracker: Recorder,
    local: LocalResults,
    checkpoints: dict[str, _Checkpoint],
    todo: list[Job],
    options: EvalOptions,
    fail: dict[str, int],
) -> tuple[list[JobFailure], dict[str, list[str]]]:
    """Run ``todo`` on the executor the options ask for (Ray is only started when there is something to run).
    Interrupted, every parent run is marked KILLED: ``resume`` picks them up again."""
    if not todo:
        return [], {}
    try:
        executor: Executor = (
            OnRay(options.ray_address, options.cpus_per_job, options.gpus_per_job, options.finetune.device)
            if options.ray
            else InProcess()
        )
        try:
            return _run_jobs(tracker, local, checkpoints, todo, executor, options.max_retries, fail)
        finally:
            executor.close()
    except BaseException:
        for entry in checkpoints.values():
            if entry.parent:
                tracker.end(entry.parent, "KILLED")
        raise


def _run_jobs(
    tracker: Recorder,
    local: LocalResults,
    checkpoints: dict[str, _Checkpoint],
    todo: list[Job],
    executor: Executor,
    max_retries: int,
    fail: dict[str, int],
) -> tuple[list[JobFailure], dict[str, list[str]]]:
    """Run every job, record each attempt as it finishes (a result on disk first, then in MLflow), run failures
    again; returns those still failing and the nested runs of every job.

    ``fail`` is the parsed ``eval_fail`` fault: {task: attempts made to fail}."""
    failures: list[JobFailure] = []
    job_runs: dict[str, list[str]] = {}

    def submit(job: Job, attempt: int) -> None:
        executor.submit(job, attempt, TASKS[job.task], fail.get(job.task, 0))

    for job in todo:
        submit(job, 1)
    while executor.pending():
        done = executor.next_done()
        job, attempt, entry = done.job, done.attempt, checkpoints[done.job.checkpoint]
        name = f"[{entry.row.label}] {job.key}"
        runs = job_runs.setdefault(f"{job.checkpoint}::{job.key}", [])
        if done.result is not None:
            local.save(entry.key, job, done.result, executor.tags)
            if entry.parent and (run_id := tracker.log_job(entry.parent, job, done.result, executor.tags)):
                local.mark_recorded(entry.key, job.key, entry.parent, run_id)
                runs.append(run_id)
            log.info("%s done on %s: %s", name, done.result["device"], _brief(done.result["metrics"]))
            continue
        if entry.parent and (
            run_id := tracker.log_failed_attempt(entry.parent, job, attempt, done.error, done.details)
        ):
            runs.append(run_id)
        if attempt <= max_retries:
            log.warning("%s failed (attempt %d): %s; retrying", name, attempt, done.error)
            submit(job, attempt + 1)
        else:
            log.error("%s failed after %d attempts: %s", name, attempt, done.error)
            failures.append(JobFailure(job, attempt, done.error))
    return failures, job_runs


def _summarise(tracker: Recorder, local: LocalResults, checkpoints: dict[str, _Checkpoint]) -> list[TableRow]:
    """The table's rows, from the results on disk and what MLflow holds (jobs recorded from another output
    directory), so resumed and fresh jobs are summarised alike; each parent run gets its row's medians."""
    for entry in checkpoints.values():
        in_mlflow = tracker.finished_jobs(entry.parent) if entry.parent else None
        entry.finished = {**(entry.recorded if in_mlflow is None else in_mlflow), **local.records(entry.key)}
        entry.row.summaries = select(list(entry.finished.values()))
        if entry.parent:
            summary = {f"{t}/{m}": v for t, s in entry.row.summaries.items() for m, v in s.metrics.items()}
            summary.update({f"{t}/best_lr": s.lr for t, s in entry.row.summaries.items()})
            tracker.log_metrics(entry.parent, summary)
    return [entry.row for entry in checkpoints.values()]


def _write_results(
    tracker: Recorder,
    checkpoints: dict[str, _Checkpoint],
    table: list[TableRow],
    failures: list[JobFailure],
    output_dir: Path,
) -> dict[str, str]:
    """The table's files in ``output_dir`` and on each parent run, which is then closed (FAILED if a job of its
    checkpoint still failed); returns the files by name."""
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
    for ckpt, entry in checkpoints.items():
        if entry.parent:
            tracker.log_files(entry.parent, files)
            tracker.close_parent(entry.parent, failed=any(f.job.checkpoint == ckpt for f in failures))
    return files


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())[:6])
