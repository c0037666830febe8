"""Model selection (best learning rate per task on dev, median over seeds) and the paper's results table.

The layout is the paper's GLUE table: mask, sparsity, MNLI m/mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE,
avg, one row per checkpoint, with SQuAD v1.1/v2.0 EM/F1 (and any registered task with a table entry) beside
it. A task's columns and metrics are its ``TaskSpec.table``. avg is the mean of the GLUE columns (nine
numbers, MNLI m and mm counted apart), which reproduces the paper's avg column.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from eval.tasks import GLUE_TASKS, TASKS, TableColumns, selection_score, table_order


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


FOOTNOTE = (
    "Dev sets; median over seeds at the best learning rate per task. QQP, MRPC: F1; STS-B: Spearman; "
    "CoLA: Matthews corr.; SQuAD: EM/F1 (official scorers; v2.0 overall); others: accuracy. "
    "Sparsity: % of masked attention positions at the GLUE sequence length."
)


# (task name, its table entry), in table order
Section = list[tuple[str, TableColumns]]


def _sections() -> tuple[Section, Section]:
    """What the table shows: the paper's GLUE tasks (always, and averaged), then every other task with a
    ``table`` entry (SQuAD, registered tasks)."""
    shown: Section = [(t, table) for t in table_order() if (table := TASKS[t].table) is not None]
    return [s for s in shown if s[0] in GLUE_TASKS], [s for s in shown if s[0] not in GLUE_TASKS]


def _columns(section: Section) -> list[str]:
    return [col for _, table in section for col, _ in table.columns]


def row_values(row: TableRow) -> dict[str, float | None]:
    """The row's numbers in percent, keyed by CSV column; None where a task was not (successfully) run."""
    glue, others = _sections()
    values: dict[str, float | None] = {"sparsity": None if row.sparsity is None else 100.0 * row.sparsity}
    for task, table in (*glue, *others):
        s = row.summaries.get(task)
        for col, metric in table.columns:
            values[col] = table.scale * s.metrics[metric] if s and metric in s.metrics else None
    run = [v for c in _columns(glue) if (v := values[c]) is not None]
    values["avg"] = sum(run) / len(run) if run else None
    return values


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def render_markdown(rows: list[TableRow]) -> str:
    glue, others = _sections()
    # The other tasks' columns only when a row has that task (SQuAD v1.1 and v2.0 come as a pair): the paper's
    # table is GLUE alone, and a registered task nobody ran here is not a column.
    ran = {t for t, _ in others if any(t in r.summaries for r in rows)}
    paired = {TASKS[t].kind for t in ran} - {"glue"}
    extra = [(t, table) for t, table in others if t in ran or TASKS[t].kind in paired]
    header = ["mask", "sparsity", *(table.header for _, table in glue), "avg"]
    header += [table.header for _, table in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    partial = False
    for row in rows:
        v = row_values(row)
        avg = _fmt(v["avg"])
        if v["avg"] is not None and any(v[c] is None for c in _columns(glue)):
            avg, partial = avg + "*", True
        # several columns of one task share a cell: "81.9/81.9"
        cells = {t: "/".join(_fmt(v[col]) for col, _ in table.columns) for t, table in (*glue, *extra)}
        row_cells = [row.label, _fmt(v["sparsity"]), *(cells[t] for t, _ in glue), avg]
        lines.append("| " + " | ".join(row_cells + [cells[t] for t, _ in extra]) + " |")
    notes = [FOOTNOTE] + (["\\* avg over the GLUE columns that were run."] if partial else [])
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def render_csv(rows: list[TableRow]) -> str:
    glue, others = _sections()
    cols = ["sparsity", *_columns(glue), "avg", *_columns(others)]
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
    order = table_order()
    for row in rows:
        for task in sorted(row.summaries, key=order.index):
            s = row.summaries[task]
            for metric, value in s.metrics.items():
                seeds = " ".join(map(str, s.seeds))
                writer.writerow(
                    [row.label, row.checkpoint, task, f"{s.lr:g}", seeds, metric, round(value, 6)]
                )
    return buf.getvalue()
