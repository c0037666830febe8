"""The study's results: the evaluation of every arm's export in one fan-out, then the table (``results.md``,
``results.csv``), the figures and what the study's MLflow run holds of them."""

from __future__ import annotations

import json
from pathlib import Path

from sparsebert.study import figures, report
from sparsebert.study.paper import PaperRow, paper_row
from sparsebert.study.place import StudyPlace
from sparsebert.study.plan import ArmPlan, Plan
from sparsebert.study.tracking import StudyRun

FIGURES = ("tradeoff.png", "mask_gallery.png", "importance_over_search.png")


def evaluate(plan: Plan, place: StudyPlace, options) -> int:
    """Fine-tune every export (finished jobs of an earlier attempt are kept: ``resume``) and keep the table's
    numbers in ``summary.json``; returns how many jobs still failed."""
    from eval.runner import run_evaluation

    outcome = run_evaluation(options)
    patterns = {a.arm.name: a.arm.config.model.attention_pattern for a in plan.arms}
    summary = report.summarize(outcome.rows, options.task_names, plan.study.reference, patterns)
    place.write_text("summary.json", json.dumps(summary, indent=1))
    place.publish("eval")
    return len(outcome.failures)


def report_files(plan: Plan, place: StudyPlace, run: StudyRun) -> str:
    """The table and the figures from ``summary.json``, in ``output_dir`` and on the study's run; returns the
    table (markdown)."""
    summary = json.loads((place.local / "summary.json").read_text())
    paper = _paper(plan) if plan.study.config.paper else None
    markdown = report.markdown(summary, paper)
    place.write_text("results.md", markdown)
    place.write_text("results.csv", report.results_csv(summary, paper))
    out = place.local / "figures"
    masks = [arm_masks(place, arm) for arm in plan.arms]
    figures.tradeoff(summary, out / FIGURES[0], paper)
    figures.mask_gallery(masks, out / FIGURES[1])
    if figures.importance_over_search(masks, out / FIGURES[2]) is None:
        (out / FIGURES[2]).unlink(missing_ok=True)  # no DAM arm: no search to draw
    place.publish("figures")
    run.log_files(place.local, ["results.md", "results.csv", "summary.json", "study.yaml", "figures"])
    metrics = {}
    for arm in summary["arms"]:
        if arm["avg"] is not None:
            metrics[f"avg/{arm['arm']}"] = arm["avg"]
        if arm["sparsity"] is not None:
            metrics[f"sparsity/{arm['arm']}"] = arm["sparsity"]
    run.log_metrics(metrics)
    return markdown


def arm_masks(place: StudyPlace, arm: ArmPlan) -> figures.ArmMasks:
    """An arm's final mask, its importance at the freeze and the search's snapshots, from its tracking records."""
    from safetensors.torch import load_file

    from sparsebert.track.importance_snapshots import SNAPSHOT_DIR, by_distance, read_snapshots

    root = place.tracking(arm.dirname)
    final, frozen = (
        root / "masks" / "final" / "mask.safetensors",
        root / "masks" / "stage1_frozen" / "mask.safetensors",
    )
    mask = load_file(final)["mask"].bool() if final.is_file() else None
    importance = load_file(frozen).get("importance") if frozen.is_file() else None
    snapshots = read_snapshots(root / SNAPSHOT_DIR) if arm.arm.learned else []
    search = arm.arm.config.search_steps
    if importance is not None and snapshots and snapshots[-1][0] < search:
        snapshots.append((search, by_distance(importance)))  # the mask as it was frozen: the search's end
    return figures.ArmMasks(arm.arm.name, mask, importance, snapshots, search)


def _paper(plan: Plan) -> dict[str, PaperRow]:
    rows = {}
    for arm in plan.arms:
        row = paper_row(arm.arm.config.model.attention_pattern)
        if row is not None:
            rows[arm.arm.name] = row
    return rows


def existing_figures(place: StudyPlace) -> list[Path]:
    return [place.local / "figures" / name for name in FIGURES if (place.local / "figures" / name).is_file()]
