"""What an evaluation leaves for others: the fine-tuned models it keeps (``save_models``), each a Hub-ready folder
with its model card, uploaded when ``push_to_hub`` asks; and the evaluated export's own card, which gains the
results table's row.

A job asked to keep its model writes it, in its own process (on Ray: on its node, so ``output`` must be a shared
directory on a multi-node cluster), into ``<output>/models/<mask>-<evaluation key>/<task>/lr=<lr>_seed=<seed>``
(:func:`save_model`). Once the table is built the driver keeps, per checkpoint and task, the run whose dev score the
table reports (:func:`best_run`), deletes the others with ``save_models: best``, writes the cards and lists every
kept model in ``<output>/models.csv`` (:func:`keep_models`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.jobs import Job, recipe
from eval.table import JobRecord, TableRow, TaskSummary
from eval.tasks import TASKS, TaskSpec, selection_score
from sparsebert.export.card import CARD, EVAL_FILE, FINETUNE_FILE, write_card

log = logging.getLogger("eval")

MODELS_DIR, INDEX = "models", "models.csv"
_TASK_TYPE = {"glue": "text-classification", "squad": "question-answering"}


# --- in the job ---------------------------------------------------------------------------------------------


def model_dir(output: str | Path, label: str, eval_key: str, job: Job) -> str:
    """Where ``job`` of a checkpoint (its table row's ``label``, its evaluation key) keeps its model."""
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_") or "model"
    root = Path(output).resolve() / MODELS_DIR / f"{slug}-{eval_key[:8]}"
    return str(root / job.task / f"lr={job.lr:g}_seed={job.seed}")


def save_model(model, tokenizer, job: Job, task: TaskSpec, metrics: dict[str, float]) -> Path:
    """Write the fine-tuned ``model`` to ``job.save_to``, atomically: weights, the model code (a standalone export
    when its mask is the package's), label names, the tokenizer and :data:`FINETUNE_FILE` (what its card says)."""
    from sparsebert.model.masks import is_builtin

    out = Path(job.save_to)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if task.labels is not None:  # a text-classification pipeline then answers with the task's own labels
        model.config.id2label = dict(enumerate(task.labels))
        model.config.label2id = {label: i for i, label in enumerate(task.labels)}
    elif task.kind == "glue":
        model.config.problem_type = "regression"
    model.save_pretrained(tmp, standalone=is_builtin(model.config.mask_spec))
    tokenizer.save_pretrained(tmp)
    (tmp / FINETUNE_FILE).write_text(json.dumps(_finetune_record(job, task, metrics), indent=1))
    shutil.rmtree(out, ignore_errors=True)  # a retried job's earlier attempt
    os.replace(tmp, out)
    return out


def _finetune_record(job: Job, task: TaskSpec, metrics: dict[str, float]) -> dict[str, Any]:
    cfg = job.config
    return {
        "kind": task.kind,
        "task": task.name,
        "task_label": task_label(task),
        "labels": list(task.labels) if task.labels is not None else None,
        "base_model": job.checkpoint,
        "lr": job.lr,
        "seed": job.seed,
        "recipe": recipe(cfg),
        "max_seq_len": cfg.max_seq_len if task.kind == "glue" else cfg.squad_max_seq_len,
        "dev_metrics": metrics,
        "results": [_result(task, metric, value) for metric, value in sorted(metrics.items())],
        "kept": "written by its fine-tuning job",
    }


def task_label(task: TaskSpec) -> str:
    if task.kind == "squad":
        return f"SQuAD v{'2.0' if task.version_2 else '1.1'}"
    return f"GLUE {task.dir_name}" if task.hub_path == "nyu-mll/glue" else task.name


def _result(task: TaskSpec, metric: str, value: float) -> dict[str, Any]:
    """One entry of a card's ``model-index`` (the Hub's evaluation results)."""
    suffix = next((s for s in task.dev_splits if s and metric.endswith(f"_{s}")), "")
    return {
        "task_type": _TASK_TYPE[task.kind], "dataset": task.hub_path or task.name, "dataset_name": task_label(task),
        "config": task.hub_config, "split": task.dev_splits[suffix][1], "metric": metric, "value": value,
    }  # fmt: skip


# --- in the driver ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptModel:
    label: str
    checkpoint: str
    task: str
    lr: float
    seed: int
    best: bool  # the run the table reports
    path: Path


def best_run(records: list[JobRecord], summary: TaskSummary) -> JobRecord:
    """The run whose dev score the table reports for a task: at the selected learning rate, the median seed by the
    selection score (the upper one of the two middle seeds when their number is even)."""
    task = TASKS[summary.task]
    runs = [r for r in records if r.task == summary.task and r.lr == summary.lr]
    runs.sort(key=lambda r: (selection_score(task, r.metrics), r.seed))
    return runs[len(runs) // 2]


def keep_models(
    output: str | Path, rows: list[tuple[TableRow, str, list[JobRecord]]], mode: str
) -> list[KeptModel]:
    """Per (row, evaluation key, finished jobs): keep each task's best run's model (and with ``mode="all"`` the
    others), write their cards and ``models.csv``; returns the kept models."""
    kept: list[KeptModel] = []
    for row, eval_key, records in rows:
        for task, summary in row.summaries.items():
            best = best_run(records, summary)
            for record in records:
                if record.task != task:
                    continue
                job = Job(row.checkpoint, task, record.lr, record.seed)
                path = Path(model_dir(output, row.label, eval_key, job))
                if record is not best and mode != "all":
                    shutil.rmtree(path, ignore_errors=True)
                elif not (path / "config.json").is_file():
                    log.warning(
                        "[%s] %s: no model kept (its job ran without keeping one)", row.label, job.key
                    )
                else:
                    kept.append(KeptModel(row.label, row.checkpoint, task, record.lr, record.seed,
                                          record is best, path))  # fmt: skip
                    _describe(path, summary, record is best)
    _write_index(Path(output) / INDEX, kept)
    return kept


def _describe(path: Path, summary: TaskSummary, best: bool) -> None:
    record = json.loads((path / FINETUNE_FILE).read_text())
    seeds = ", ".join(map(str, summary.seeds))
    record["kept"] = (
        f"the run the results table reports: the median seed by dev score at the best learning rate "
        f"({summary.lr:g}; seeds {seeds})"
        if best
        else f"every run kept (save_models: all); the table reports learning rate {summary.lr:g}, seeds {seeds}"
    )
    (path / FINETUNE_FILE).write_text(json.dumps(record, indent=1))
    write_card(path)


def _write_index(path: Path, kept: list[KeptModel]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["mask", "checkpoint", "task", "lr", "seed", "reported", "path"])
        for m in kept:
            writer.writerow([m.label, m.checkpoint, m.task, f"{m.lr:g}", m.seed, int(m.best), m.path])


def hub_repo(prefix: str, model: KeptModel, several: bool) -> str:
    """``ORG/NAME-<task>``, or ``ORG/NAME-<mask>-<task>`` when several checkpoints were evaluated."""
    label = re.sub(r"[^A-Za-z0-9.]+", "-", model.label).strip("-") if several else ""
    return "-".join(part for part in (prefix, label, model.task.replace("_", "-")) if part)


def push_best(prefix: str, kept: list[KeptModel]) -> list[str]:
    """Upload each best kept model (:func:`hub_repo`); returns the errors (a failed upload keeps the folder)."""
    from sparsebert.export.hub import HubError, push_folder

    best = [m for m in kept if m.best]
    several = len({m.checkpoint for m in best}) > 1
    errors = []
    for model in best:
        repo = hub_repo(prefix, model, several)
        try:
            log.info("[%s] %s uploaded: %s", model.label, model.task, push_folder(model.path, repo))
        except HubError as err:
            errors.append(f"{err}; retry with `python -m sparsebert.export.hub {model.path} {repo}`")
    return errors


def record_on_checkpoint(row: TableRow, selection: str) -> Path | None:
    """Add the row's results to the evaluated export's card (:data:`EVAL_FILE`, then ``README.md`` again) when the
    checkpoint is a local SparseBERT export with a card; returns the card, or None when it has none."""
    folder = Path(row.checkpoint)
    config = folder / "config.json"
    if not (folder / CARD).is_file() or not config.is_file():
        return None
    if json.loads(config.read_text()).get("model_type") != "sparsebert":
        return None
    rows = []
    for task, summary in row.summaries.items():
        spec = TASKS[task]
        for column, metric in spec.table.columns if spec.table else ():
            if metric in summary.metrics:
                result = _result(spec, metric, spec.table.scale * summary.metrics[metric])
                rows.append({**result, "column": column, "lr": summary.lr, "seeds": list(summary.seeds)})
    (folder / EVAL_FILE).write_text(json.dumps({"selection": selection, "rows": rows}, indent=1))
    return write_card(folder)
