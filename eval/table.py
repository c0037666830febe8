"""Model selection (best learning rate per task on dev, median over seeds) and the paper's results table.

The layout is DESIGN.md's GLUE table: mask, sparsity, MNLI m/mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE, avg,
with SQuAD v1.1/v2.0 EM/F1 beside it, one row per checkpoint. One number per GLUE task as in BERT
(Devlin et al., 2019), which the paper's numbers match: F1 for QQP and MRPC, Spearman for STS-B, Matthews
correlation for CoLA, accuracy elsewhere; avg is the mean of those nine numbers (MNLI m and mm counted
apart), which reproduces the paper's avg column.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from eval.tasks import GLUE_TASKS, TASKS, selection_score


@dataclass(frozen=True)
class JobRecord:
    """A finished job's result as recorded in MLflow."""

    task: str
    lr: float
    seed: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class TaskSummary:
    task: str
    lr: float  # the selected learning rate
    seeds: tuple[int, ...]
    metrics: dict[str, float]  # medians over seeds at that learning rate
    score: float  # what the learning rate was selected on


@dataclass
class TableRow:
    label: str
    checkpoint: str
    sparsity: float | None  # fraction of masked positions
    summaries: dict[str, TaskSummary] = field(default_factory=dict)


def select(records: list[JobRecord]) -> dict[str, TaskSummary]:
    """Per task: the learning rate whose median (over seeds) headline score is best, and its medians."""
    groups: dict[tuple[str, float], list[JobRecord]] = defaultdict(list)
    for r in records:
        groups[(r.task, r.lr)].append(r)
    best: dict[str, TaskSummary] = {}
    for (task, lr), recs in sorted(groups.items()):
        keys = set.intersection(*(set(r.metrics) for r in recs))
        medians = {k: float(statistics.median(r.metrics[k] for r in recs)) for k in sorted(keys)}
        try:
            score = selection_score(TASKS[task], medians)
        except KeyError:
            continue  # a record without the task's headline metric cannot be ranked
        if task not in best or score > best[task].score:
            best[task] = TaskSummary(task, lr, tuple(sorted(r.seed for r in recs)), medians, score)
    return best


# (CSV column, task, metric); GLUE metrics are fractions, shown in percent
GLUE_COLUMNS = [
    ("MNLI-m", "mnli", "accuracy_m"),
    ("MNLI-mm", "mnli", "accuracy_mm"),
    ("QQP", "qqp", "f1"),
    ("QNLI", "qnli", "accuracy"),
    ("SST-2", "sst2", "accuracy"),
    ("CoLA", "cola", "matthews_corr"),
    ("STS-B", "stsb", "spearman"),
    ("MRPC", "mrpc", "f1"),
    ("RTE", "rte", "accuracy"),
]
SQUAD_COLUMNS = [
    ("SQuAD1.1-EM", "squad", "exact_match"),
    ("SQuAD1.1-F1", "squad", "f1"),
    ("SQuAD2.0-EM", "squad_v2", "exact"),
    ("SQuAD2.0-F1", "squad_v2", "f1"),
]
FOOTNOTE = (
    "Dev sets; median over seeds at the best learning rate per task. QQP, MRPC: F1; STS-B: Spearman; "
    "CoLA: Matthews corr.; SQuAD: EM/F1 (official scorers; v2.0 overall); others: accuracy. "
    "Sparsity: % of masked attention positions at the GLUE sequence length."
)


def row_values(row: TableRow) -> dict[str, float | None]:
    """The row's numbers in percent, keyed by CSV column; None where a task was not (successfully) run."""
    values: dict[str, float | None] = {"sparsity": None if row.sparsity is None else 100.0 * row.sparsity}
    for col, task, metric in GLUE_COLUMNS:
        s = row.summaries.get(task)
        values[col] = 100.0 * s.metrics[metric] if s and metric in s.metrics else None
    glue = [values[c] for c, _, _ in GLUE_COLUMNS if values[c] is not None]
    values["avg"] = sum(glue) / len(glue) if glue else None  # type: ignore[arg-type]
    for col, task, metric in SQUAD_COLUMNS:
        s = row.summaries.get(task)
        values[col] = s.metrics[metric] if s and metric in s.metrics else None  # already percent
    return values


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def render_markdown(rows: list[TableRow]) -> str:
    with_squad = any(t in r.summaries for r in rows for t in ("squad", "squad_v2"))
    header = ["mask", "sparsity", "MNLI m/mm", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE", "avg"]
    if with_squad:
        header += ["SQuAD v1.1 EM/F1", "SQuAD v2.0 EM/F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    partial = False
    for row in rows:
        v = row_values(row)
        missing = sum(v[c] is None for c, _, _ in GLUE_COLUMNS)
        avg = _fmt(v["avg"])
        if v["avg"] is not None and missing:
            avg, partial = avg + "*", True
        cells = [row.label, _fmt(v["sparsity"]), f"{_fmt(v['MNLI-m'])}/{_fmt(v['MNLI-mm'])}"]
        cells += [_fmt(v[c]) for c, _, _ in GLUE_COLUMNS[2:]] + [avg]
        if with_squad:
            cells += [f"{_fmt(v['SQuAD1.1-EM'])}/{_fmt(v['SQuAD1.1-F1'])}"]
            cells += [f"{_fmt(v['SQuAD2.0-EM'])}/{_fmt(v['SQuAD2.0-F1'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [FOOTNOTE] + (["\\* avg over the GLUE columns that were run."] if partial else [])
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def render_csv(rows: list[TableRow]) -> str:
    cols = ["sparsity", *(c for c, _, _ in GLUE_COLUMNS), "avg", *(c for c, _, _ in SQUAD_COLUMNS)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["mask", *cols, "checkpoint"])
    for row in rows:
        v = row_values(row)
        writer.writerow([row.label, *("" if v[c] is None else round(v[c], 4) for c in cols), row.checkpoint])
    return buf.getvalue()


def render_selection_csv(rows: list[TableRow]) -> str:
    """Every selected (task, learning rate) with its seeds and all median metrics, for the curious."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["mask", "checkpoint", "task", "lr", "seeds", "metric", "median"])
    order = [*GLUE_TASKS, *(t for t in TASKS if t not in GLUE_TASKS)]
    for row in rows:
        for task in sorted(row.summaries, key=order.index):
            s = row.summaries[task]
            for metric, value in s.metrics.items():
                seeds = " ".join(map(str, s.seeds))
                writer.writerow(
                    [row.label, row.checkpoint, task, f"{s.lr:g}", seeds, metric, round(value, 6)]
                )
    return buf.getvalue()
