"""One short pre-training run in the fast tier: ``python sparsebert/pretrain.py`` without the launcher (one CPU
rank), a DAM_s search frozen after 2 of 4 steps, a checkpoint, an export and an MLflow run, read back through
MLflow and ``from_pretrained``. Then the finished run as what ``model.init_from`` continues from (unit level: the
two-phase runs themselves are in test_continuation.py, marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PRETRAIN, REPO
from mlflow import MlflowClient

from sparsebert import SparseBertForPreTraining
from sparsebert.train import continuation
from sparsebert.train.config import ConfigError, load_config

STEPS = 4
ARGS = [
    "--config", "tiny_cpu", "model.max_position_embeddings=64", "model.attention_pattern={name: dam_s, lambda: 0.01}",
    f"train.max_steps={STEPS}", "dam.search_steps=2", "train.micro_batch_size=4", "train.warmup_steps=1",
    "train.log_every=1", "eval.every=2", "eval.max_batches=1", "checkpoint.every=2", "mlflow.experiment=smoke",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, pretrain_corpus) -> tuple[Path, str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("smoke")
    out, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, str(PRETRAIN), *ARGS, f"output_dir={out}", f"data.path={pretrain_corpus}"],
        cwd=root, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, uri, result


def test_a_plain_python_run_searches_freezes_checkpoints_and_exports(run):
    out, _, _ = run
    assert (out / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    model = SparseBertForPreTraining.from_pretrained(out / "final")
    assert model.config.attention_pattern["name"] == "dam_s" and model.config.attention_pattern["frozen"]


def test_the_run_is_recorded_in_mlflow(run):
    _, uri, _ = run
    client = MlflowClient(uri)
    [recorded] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert recorded.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(recorded.info.run_id, "loss")] == list(
        range(1, STEPS + 1)
    )


def test_a_finished_run_is_a_source_to_continue_from_with_its_frozen_mask(run):
    out, _, _ = run
    source = continuation.locate(str(out))  # a run's output_dir means its final/
    assert source.model_dir == str(out / "final") and source.run_dir == out
    assert source.pattern["name"] == "dam_s" and source.searched_alpha_in_optimizer
    dense = load_config("tiny_cpu", [f"model.init_from={out}", "model.attention_pattern=dense"])
    kept, note = continuation.resolve_mask(dense, source)  # a pattern left at dense keeps the checkpoint's
    assert kept.model.attention_pattern == source.pattern and note is None
    with pytest.raises(ConfigError, match=r"contradicts the mask of model\.init_from"):
        continuation.resolve_mask(
            load_config("tiny_cpu", [f"model.init_from={out}", "model.attention_pattern=star"]), source
        )


def test_a_directory_that_is_neither_a_model_nor_a_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither an HF model directory"):
        continuation.locate(str(tmp_path))
