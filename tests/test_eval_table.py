"""Selection (best learning rate on the median over seeds) and the paper's table layout."""

from __future__ import annotations

import csv
import io

import pytest

from eval.table import (
    JobRecord,
    TableRow,
    TaskSummary,
    render_csv,
    render_markdown,
    render_selection_csv,
    select,
)

PAPER_HEADER = "| mask | sparsity | MNLI m/mm | QQP | QNLI | SST-2 | CoLA | STS-B | MRPC | RTE | avg |"


def test_best_lr_is_chosen_on_the_median_over_seeds():
    recs = [
        # lr 1e-5: scores 0.9, 0.5, 0.5 -> mean 0.63, median 0.5
        *(
            JobRecord("sst2", 1e-5, s, {"accuracy": a})
            for s, a in zip((1, 2, 3), (0.9, 0.5, 0.5), strict=True)
        ),
        # lr 2e-5: scores 0.6, 0.6, 0.1 -> mean 0.43, median 0.6 (wins on the median)
        *(
            JobRecord("sst2", 2e-5, s, {"accuracy": a})
            for s, a in zip((1, 2, 3), (0.6, 0.6, 0.1), strict=True)
        ),
        JobRecord("mnli", 1e-5, 1, {"accuracy_m": 0.8, "accuracy_mm": 0.7}),
        JobRecord("mnli", 1e-5, 2, {"accuracy_m": 0.6, "accuracy_mm": 0.9}),
        JobRecord("mnli", 3e-5, 1, {"accuracy_m": 0.72, "accuracy_mm": 0.72}),
    ]
    best = select(recs)
    assert (
        best["sst2"].lr == 2e-5
        and best["sst2"].metrics == {"accuracy": 0.6}
        and best["sst2"].seeds == (1, 2, 3)
    )
    # MNLI is selected on mean(m, mm) of the medians: 1e-5 -> (0.7 + 0.8) / 2 = 0.75 > 0.72
    assert best["mnli"].lr == 1e-5 and best["mnli"].metrics == pytest.approx(
        {"accuracy_m": 0.7, "accuracy_mm": 0.8}
    )


def _summary(task: str, **metrics: float) -> TaskSummary:
    return TaskSummary(task, 2e-5, (1, 2, 3), metrics, 0.0)


def _strided_row() -> TableRow:
    """The paper's Strided row, as the metrics our jobs record (fractions)."""
    s = {
        "mnli": _summary("mnli", accuracy_m=0.819, accuracy_mm=0.819),
        "qqp": _summary("qqp", f1=0.871, accuracy=0.9),
        "qnli": _summary("qnli", accuracy=0.890),
        "sst2": _summary("sst2", accuracy=0.917),
        "cola": _summary("cola", matthews_corr=0.584),
        "stsb": _summary("stsb", pearson=0.88, spearman=0.866),
        "mrpc": _summary("mrpc", f1=0.861, accuracy=0.8),
        "rte": _summary("rte", accuracy=0.527),
    }
    return TableRow("Strided", "/ckpt/strided", 0.704, s)


def test_markdown_reproduces_the_papers_row_and_avg():
    md = render_markdown([_strided_row()])
    lines = md.splitlines()
    assert lines[0] == PAPER_HEADER
    assert (
        lines[2] == "| Strided | 70.4 | 81.9/81.9 | 87.1 | 89.0 | 91.7 | 58.4 | 86.6 | 86.1 | 52.7 | 79.5 |"
    )
    assert "QQP, MRPC: F1; STS-B: Spearman" in md and "*" not in lines[2]


def test_rows_side_by_side_with_missing_tasks_and_squad():
    partial = TableRow(
        "star",
        "/ckpt/star",
        0.961,
        {"sst2": _summary("sst2", accuracy=0.9), "rte": _summary("rte", accuracy=0.6)},
    )
    partial.summaries["squad_v2"] = _summary("squad_v2", exact=70.0, f1=73.25)
    md = render_markdown([_strided_row(), partial])
    lines = md.splitlines()
    assert lines[0] == PAPER_HEADER + " SQuAD v1.1 EM/F1 | SQuAD v2.0 EM/F1 |"
    assert lines[2].endswith("| 79.5 | —/— | —/— |")
    assert lines[3] == "| star | 96.1 | —/— | — | — | 90.0 | — | — | — | 60.0 | 75.0* | —/— | 70.0/73.2 |"
    assert "avg over the GLUE columns that were run" in md

    rows = list(csv.DictReader(io.StringIO(render_csv([_strided_row(), partial]))))
    assert [r["mask"] for r in rows] == ["Strided", "star"]
    assert float(rows[0]["avg"]) == pytest.approx(79.4888, abs=1e-3)
    assert float(rows[0]["MNLI-mm"]) == pytest.approx(81.9) and rows[1]["QQP"] == ""
    assert float(rows[1]["SQuAD2.0-F1"]) == pytest.approx(73.25) and rows[1]["checkpoint"] == "/ckpt/star"

    detail = list(csv.DictReader(io.StringIO(render_selection_csv([partial]))))
    assert {(d["task"], d["metric"]) for d in detail} == {
        ("sst2", "accuracy"), ("rte", "accuracy"), ("squad_v2", "exact"), ("squad_v2", "f1")
    }  # fmt: skip
