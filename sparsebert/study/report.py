"""The study's table: the paper's layout (mask, sparsity, a column per task, avg), one row per arm, the reference
arm (dense) first, every other number with its difference to the reference, and, with ``paper: true``, the paper's
published row under each arm of its patterns.

The numbers come from the evaluation (medians over seeds at the best learning rate, :mod:`eval.table`) and are
kept in ``summary.json``, which the table, the figures and a rerun of a finished study read.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from eval.table import FOOTNOTE, TableRow, row_values
from eval.tasks import GLUE_TASKS, TASKS, table_order
from sparsebert.study.paper import PaperRow


@dataclass(frozen=True)
class Column:
    task: str
    header: str  # the markdown header (one cell)
    names: tuple[str, ...]  # results.csv columns in that cell


def summarize(
    rows: list[TableRow], tasks: list[str], reference: str | None, patterns: dict[str, Any]
) -> dict:
    """What ``summary.json`` holds: the columns of the tasks run, each arm's sparsity and numbers (percent),
    its average (over the GLUE columns, as the paper's avg, or over every column when no GLUE task ran) and the
    mask it was trained with."""
    columns = [
        Column(t, table.header, tuple(name for name, _ in table.columns))
        for t in table_order()
        if t in tasks and (table := TASKS[t].table) is not None
    ]
    glue = any(c.task in GLUE_TASKS for c in columns)
    averaged = [n for c in columns if c.task in GLUE_TASKS or not glue for n in c.names]
    arms = []
    for row in rows:
        values = row_values(row)
        numbers = {n: values.get(n) for c in columns for n in c.names}
        present = [numbers[n] for n in averaged if numbers[n] is not None]
        arms.append({
            "arm": row.label, "checkpoint": row.checkpoint, "pattern": patterns.get(row.label),
            "sparsity": values["sparsity"], "values": numbers,
            "avg": sum(present) / len(present) if present else None, "complete": len(present) == len(averaged),
        })  # fmt: skip
    return {
        "columns": [{"task": c.task, "header": c.header, "names": list(c.names)} for c in columns],
        "averaged": averaged,
        "reference": reference if any(a["arm"] == reference for a in arms) else None,
        "arms": arms,
    }


def columns(summary: dict) -> list[Column]:
    return [Column(c["task"], c["header"], tuple(c["names"])) for c in summary["columns"]]


def ordered(summary: dict) -> list[dict]:
    """The arms, the reference first."""
    ref = summary["reference"]
    return sorted(summary["arms"], key=lambda a: a["arm"] != ref)


def markdown(summary: dict, paper: dict[str, PaperRow] | None = None) -> str:
    """The table in markdown: values with their difference to the reference in parentheses."""
    cols, ref_name = columns(summary), summary["reference"]
    ref = next((a for a in summary["arms"] if a["arm"] == ref_name), None)
    header = ["mask", "sparsity", *(c.header for c in cols), "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in ordered(summary):
        base = None if arm is ref else ref
        label = f"{arm['arm']} (reference)" if arm is ref else arm["arm"]
        cells = [
            "/".join(_cell(arm["values"].get(n), base and base["values"].get(n)) for n in c.names)
            for c in cols
        ]
        avg = _cell(arm["avg"], base and base["avg"]) + ("" if arm["complete"] else "*")
        lines.append("| " + " | ".join([label, _fmt(arm["sparsity"]), *cells, avg]) + " |")
        row = (paper or {}).get(arm["arm"])
        if row is not None:
            cells = ["/".join(_fmt(row.values.get(n)) for n in c.names) for c in cols]
            lines.append(
                "| "
                + " | ".join(
                    [f"{arm['arm']}: paper ({row.label})", _fmt(row.sparsity), *cells, _fmt(row.avg)]
                )
                + " |"
            )
    notes = [FOOTNOTE]
    if ref is not None:
        notes.append(f"In parentheses: the difference to {ref_name}, in points.")
    if paper:
        notes.append("Paper rows: BERT-base as published by the paper's authors (their repository's README).")
    if not all(a["complete"] for a in summary["arms"]):
        notes.append("\\* avg over the columns that were run.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def results_csv(summary: dict, paper: dict[str, PaperRow] | None = None) -> str:
    names = [n for c in columns(summary) for n in c.names]
    ref = next((a for a in summary["arms"] if a["arm"] == summary["reference"]), None)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["mask", "source", "sparsity", *names, "avg", "avg_delta", "checkpoint"])
    for arm in ordered(summary):
        delta = arm["avg"] - ref["avg"] if ref and arm["avg"] is not None and ref["avg"] is not None else None
        writer.writerow(
            [
                arm["arm"],
                "measured",
                *map(_num, [arm["sparsity"], *(arm["values"].get(n) for n in names), arm["avg"], delta]),
                arm["checkpoint"],
            ]
        )
        row = (paper or {}).get(arm["arm"])
        if row is not None:
            writer.writerow(
                [
                    arm["arm"],
                    "paper",
                    *map(_num, [row.sparsity, *(row.values.get(n) for n in names), row.avg, None]),
                    "",
                ]
            )
    return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _cell(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return _fmt(value)
    return f"{value:.1f} ({value - reference:+.1f})".replace("-", "−")


def _num(value: float | None) -> str | float:
    return "" if value is None else round(value, 4)
