"""The study's outputs from small synthetic results: the paper-layout table (sparsity column, the dense reference
first, deltas to it, the paper's rows), the trade-off plot's Pareto front, the mask gallery, the importance over
the search, and the study's MLflow run holding them, read back through MlflowClient."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from sparsebert.model.masks import build_mask
from sparsebert.study import figures, report, results
from sparsebert.study.config import load_study
from sparsebert.study.paper import paper_row
from sparsebert.study.place import StudyPlace
from sparsebert.study.plan import make_plan
from sparsebert.study.tracking import StudyRun
from sparsebert.track.importance_snapshots import SNAPSHOT_DIR, bands, by_distance, snapshot_name

COLUMNS = [{"task": "docs_order", "header": "Order", "names": ["Order"]}]


def _arm(name: str, sparsity: float, score: float, pattern) -> dict:
    return {"arm": name, "checkpoint": f"/x/{name}/final", "pattern": pattern, "sparsity": sparsity,
            "values": {"Order": score}, "avg": score, "complete": True}  # fmt: skip


def _summary() -> dict:
    arms = [_arm("star", 96.1, 61.0, "star"), _arm("dense", 0.0, 70.0, "dense"),
            _arm("longformer", 88.7, 71.5, "longformer"), _arm("dam_s", 91.2, 66.0, {"name": "dam_s", "lambda": 1e-4})]  # fmt: skip
    return {"columns": COLUMNS, "averaged": ["Order"], "reference": "dense", "arms": arms}


def test_the_table_has_the_paper_layout_with_deltas_to_dense():
    summary = _summary()
    paper = {a["arm"]: row for a in summary["arms"] if (row := paper_row(a["pattern"])) is not None}
    table = report.markdown(summary, paper).splitlines()
    assert table[0] == "| mask | sparsity | Order | avg |"
    assert table[2] == "| dense (reference) | 0.0 | 70.0 | 70.0 |"  # the reference first, without deltas
    assert table[3] == "| star | 96.1 | 61.0 (−9.0) | 61.0 (−9.0) |"
    assert table[4].startswith("| star: paper (Star) | 96.1 |") and table[4].endswith("| 78.9 |")
    assert "| longformer | 88.7 | 71.5 (+1.5) | 71.5 (+1.5) |" in table
    assert any(line.startswith("| dam_s: paper (DAM_s λ=1e-4) | 91.2 |") for line in table)
    csv = report.results_csv(summary, paper).splitlines()
    assert csv[0] == "mask,source,sparsity,Order,avg,avg_delta,checkpoint"
    assert csv[1].startswith("dense,measured,0.0,70.0,70.0,0.0,")
    assert csv[2].startswith("star,measured,96.1,61.0,61.0,-9.0,") and csv[3].startswith(
        "star,paper,96.1,,78.9,"
    )


def test_the_pareto_front_holds_the_arms_no_other_beats_on_both(tmp_path):
    points = [(a["arm"], a["sparsity"], a["avg"]) for a in _summary()["arms"]]
    # dense (0%, 70) is beaten by longformer (88.7%, 71.5); dam_s by nobody sparser and better; star is sparsest
    assert figures.pareto_front(points) == ["longformer", "dam_s", "star"]
    path = figures.tradeoff(_summary(), tmp_path / "tradeoff.png")
    assert Image.open(path).size[0] > 400


def _dam_snapshots(
    steps: int, layers: int = 2, heads: int = 2, length: int = 32
) -> list[tuple[int, torch.Tensor]]:
    """Importance whose diagonal falls over the search while the rest stays."""
    out = []
    for step in range(0, steps + 1, steps // 4):
        importance = torch.full((layers, heads, length, length), 0.6)
        importance.diagonal(dim1=-2, dim2=-1).fill_(0.6 - 0.5 * step / steps)
        out.append((step, by_distance(importance)))
    return out


def test_the_importance_profile_and_bands_show_a_falling_diagonal(tmp_path):
    snapshots = _dam_snapshots(40)
    first, last = (bands(profile.flatten(0, -2)) for _, profile in (snapshots[0], snapshots[-1]))
    assert torch.allclose(first["diagonal"], torch.tensor(0.6)) and torch.allclose(
        last["diagonal"], torch.tensor(0.1)
    )
    assert torch.allclose(last["near"], torch.tensor(0.6)) and torch.allclose(last["far"], torch.tensor(0.6))
    mask = build_mask("longformer", 32, 2).expand(2, 2, 32, 32)
    arms = [figures.ArmMasks("longformer", mask), figures.ArmMasks("dam_s", mask, None, snapshots, 40)]
    gallery = figures.mask_gallery(arms, tmp_path / "gallery.png")
    over = figures.importance_over_search(arms, tmp_path / "importance.png")
    assert Image.open(gallery).size[0] >= 600 and Image.open(over).size[0] > 400
    assert figures.importance_over_search(arms[:1], tmp_path / "none.png") is None  # no search to draw


def _write_arm_records(place: StudyPlace, dirname: str, pattern: str, snapshots) -> None:
    root = place.local / "arms" / dirname / "tracking" / "artifacts"
    mask = build_mask(pattern, 32, 2).expand(2, 2, 32, 32).contiguous()
    (root / "masks" / "final").mkdir(parents=True)
    save_file({"mask": mask.to(torch.uint8)}, root / "masks" / "final" / "mask.safetensors")
    for step, profile in snapshots:
        (root / SNAPSHOT_DIR).mkdir(exist_ok=True)
        save_file({"profile": profile.contiguous()}, root / SNAPSHOT_DIR / snapshot_name(step))


def test_the_report_files_land_in_output_dir_and_on_the_study_run(tmp_path, mlflow_uri):
    spec = {"name": "synthetic", "output_dir": str(tmp_path / "out"), "paper": True,
            "pretrain": {"config": "tiny_cpu", "overrides": {"train.max_steps": 100}},
            "arms": {"dense": {"model.attention_pattern": "dense"}, "star": {"model.attention_pattern": "star"},
                     "dam_s": {"model.attention_pattern": {"name": "dam_s", "lambda": 1.0e-4}}},
            "eval": {"tasks": ["docs_order"], "lrs": [1e-4], "seeds": [1]}}  # fmt: skip
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    study = load_study(str(tmp_path / "study.yaml"))
    place = StudyPlace(study.output_dir)
    plan = make_plan(study, place, {}, False)
    _write_arm_records(place, "dense", "dense", [])
    _write_arm_records(place, "star", "star", [])
    _write_arm_records(place, "dam_s", "strided", _dam_snapshots(40))
    summary = _summary()
    summary["arms"] = [a for a in summary["arms"] if a["arm"] != "longformer"]
    place.write_text("summary.json", json.dumps(summary))
    run = StudyRun("study-test", mlflow_uri, study.config.name, None, {})
    markdown = results.report_files(plan, place, run)
    run.end()
    assert "| star: paper (Star) |" in markdown and (place.local / "results.md").read_text() == markdown
    assert {p.name for p in (place.local / "figures").iterdir()} == set(results.FIGURES)

    client = MlflowClient(mlflow_uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.tags["sparsebert.kind"] == "study"
    assert stored.data.metrics["avg/star"] == 61.0 and stored.data.metrics["sparsity/dam_s"] == 91.2
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"results.md", "results.csv", "summary.json", "figures"} <= artifacts
    shown = {Path(a.path).name for a in client.list_artifacts(run.run_id, "figures")}
    assert shown == set(results.FIGURES)
    again = StudyRun("study-test", mlflow_uri, study.config.name, run.run_id, {})  # a rerun reopens it
    assert again.run_id == run.run_id
