"""A real study end to end: two arms pre-trained one after another under the ``deepspeed`` launcher (one CPU
rank), the study stopped by SIGTERM during the second arm, the same command finishing it without redoing the
first, and the same command once more doing nothing; then what MLflow holds, read back through MlflowClient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

STEPS = 40


def _write_study(tmp_path: Path) -> Path:
    spec = {
        "name": "e2e",
        "output_dir": str(tmp_path / "out"),
        "pretrain": {"config": "tiny_cpu", "overrides": {
            "train.max_steps": STEPS, "train.warmup_steps": 2, "train.log_every": 10, "eval.every": 0,
            "eval.max_batches": 2, "checkpoint.every": 4, "eval.fill_mask": []}},
        "arms": {"dense": {"model.attention_pattern": "dense"},
                 "dam_s": {"model.attention_pattern": {"name": "dam_s", "lambda": 1.0e-4, "tau": 1.0}}},
        "importance_snapshots": 4,
        "launch": {"num_gpus": 1},
        "mlflow": {"experiment": "e2e-study", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "eval": {"tasks": ["docs_order"], "lrs": [3.0e-4], "seeds": [1], "epochs": 1, "batch_size": 32,
                 "max_seq_len": 64, "max_train_samples": 64},
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _start(path: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "sparsebert.study", str(path), "--no-ray"],
                                cwd=path.parent, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())  # fmt: skip


def _run(path: Path, log: Path, timeout: float = 600) -> str:
    proc = _start(path, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return log.read_text()


def _stop_during_second_arm(path: Path, tmp_path: Path) -> str:
    """Start the study; once the second arm has written a checkpoint, SIGTERM the study (as a scheduler does)."""
    log = tmp_path / "first.log"
    proc = _start(path, log)
    latest = tmp_path / "out" / "arms" / "dam_s" / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest.is_file(), log.read_text()[-4000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]  # stopped on request: checkpointed, status 0
    return log.read_text()


def _mlflow_tree(tmp_path: Path) -> tuple[list, dict[str, list]]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e-study")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children: dict[str, list] = {}
    for run in runs:
        children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    return runs, children


def test_a_study_stopped_in_its_second_arm_finishes_with_the_same_command_and_then_does_nothing(tmp_path):
    path = _write_study(tmp_path)
    out = tmp_path / "out"
    first = _stop_during_second_arm(path, tmp_path)
    assert "arm dam_s stopped before its end (checkpointed)" in first, first[-3000:]
    dense_model = out / "arms" / "dense" / "final" / "model.safetensors"
    exported_at = dense_model.stat().st_mtime_ns
    assert not (out / "arms" / "dam_s" / "final").exists()

    second = _run(path, tmp_path / "second.log")
    assert "arm dense: finished" in second and "arm dense: starting" not in second
    assert "arm dam_s: resuming pre-training" in second
    assert dense_model.stat().st_mtime_ns == exported_at  # the first arm was not redone
    assert "| dense (reference) |" in second and "| dam_s |" in second
    assert (out / "results.md").is_file() and (out / "results.csv").is_file()
    assert {p.name for p in (out / "figures").iterdir()} == {
        "tradeoff.png", "mask_gallery.png", "importance_over_search.png"}  # fmt: skip
    snapshots = sorted((out / "arms" / "dam_s" / "tracking" / "artifacts" / "importance").iterdir())
    assert len(snapshots) >= 3  # σ(α) recorded during the search, across the interruption

    state = (out / "study.json").read_text()
    runs_before, _ = _mlflow_tree(tmp_path)
    third = _run(path, tmp_path / "third.log", timeout=180)
    assert "starting" not in third and "resuming" not in third and "fine-tuning jobs (1 per arm)" in third
    assert (out / "results.md").read_text() in third  # the results, reprinted
    assert (out / "study.json").read_text() == state
    runs_after, children = _mlflow_tree(tmp_path)
    assert len(runs_after) == len(runs_before)  # nothing new recorded

    (study,) = [r for r in runs_after if r.data.tags.get("sparsebert.kind") == "study"]
    assert study.info.status == "FINISHED" and study.info.run_name == "e2e"
    nested = {r.info.run_name: r for r in children[study.info.run_id]}
    assert {"e2e/dense", "e2e/dam_s", "eval dense", "eval dam_s"} <= set(nested)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    diagonal = client.get_metric_history(nested["e2e/dam_s"].info.run_id, "importance/diagonal")
    assert len(diagonal) >= 3  # the search's snapshots, as metrics too
    assert "figures" in {a.path for a in client.list_artifacts(study.info.run_id)}
