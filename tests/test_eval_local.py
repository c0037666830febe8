"""``--no-ray``: the jobs run one after another in this process, with the Ray path's records and table; the
device rule (a job asked for CUDA never trains on the CPU); a task registered from outside the package. Real
MLflow store, real tiny jobs, nothing mocked."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import REPO
from mlflow import MlflowClient

from eval.executors import device_for_ray
from eval.finetune import resolve_device, run_job
from eval.jobs import DataSource, FinetuneConfig, Job, evaluation_key
from eval.metrics import accuracy, f1_binary
from eval.options import EvalOptions
from eval.run import main
from eval.runner import run_evaluation
from eval.smoke import write_glue, write_squad, write_tiny_checkpoint
from eval.tasks import TASKS, TableColumns, parse_tasks, register_task

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny checkpoint, GLUE and SQuAD files."""
    root = tmp_path_factory.mktemp("local")
    ckpt = write_tiny_checkpoint(root / "dense", "dense")
    return ckpt, write_glue(root / "glue", n_train=16, n_dev=8), write_squad(root / "squad", 6, 4)


def _argv(inputs, out: Path, tasks: str = "sst2,rte,squad") -> list[str]:
    ckpt, glue, squad = inputs
    return [
        "--no-ray", "--checkpoint", str(ckpt), "--tasks", tasks, "--glue-dir", str(glue),
        "--squad-dir", str(squad), "--lrs", "1e-3", "--seeds", "1", "--max-steps", "2", "--batch-size", "4",
        "--max-seq-len", "32", "--squad-max-seq-len", "48", "--doc-stride", "16", "--output", str(out),
    ]  # fmt: skip


def _runs(client: MlflowClient):
    exp = client.get_experiment_by_name("sparsebert-eval")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sparsebert.kind") == "evaluation"]
    jobs = [r for r in runs if r.data.tags.get("sparsebert.kind") == "job"]
    return parents, jobs


def test_no_ray_records_retries_table_and_resume(mlflow_uri, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store defaults to ./mlruns
    # RTE's first attempt fails: the retry must recover it
    monkeypatch.setenv("SPARSEBERT_FAULTS", "eval_fail=rte:1")
    argv = _argv(inputs, tmp_path / "out")
    assert main(argv) == 0
    assert "3 jobs run, 0 already recorded" in capsys.readouterr().out

    client = MlflowClient(mlflow_uri)
    (parent,), jobs = _runs(client)
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags["sparsebert.train.checkpoint"] == str(
        inputs[0]
    )
    assert "device" not in parent.data.params  # where jobs ran is not part of the evaluation's recipe
    assert {a.path for a in client.list_artifacts(pid)} >= {"results.md", "results.csv", "selection.csv"}
    assert all(r.data.tags["mlflow.parentRunId"] == pid for r in jobs)
    finished = {r.data.params["task"]: r for r in jobs if r.info.status == "FINISHED"}
    (failed,) = [r for r in jobs if r.info.status == "FAILED"]
    assert set(finished) == {"sst2", "rte", "squad"} and len(jobs) == 4
    for r in finished.values():
        assert r.data.tags["sparsebert.executor"] == "in-process" and "ray.num_gpus" not in r.data.tags
        assert r.data.tags["device"] == "cpu" and r.data.params["device"] == "auto"
        assert r.data.metrics["train_steps"] == 2
    assert finished["rte"].data.tags["attempt"] == "2" and "accuracy" in finished["rte"].data.metrics
    assert {"exact_match", "f1"} <= set(finished["squad"].data.metrics)
    assert "predictions.json" in {a.path for a in client.list_artifacts(finished["squad"].info.run_id)}
    assert failed.data.params["task"] == "rte" and failed.data.tags["attempt"] == "1"
    assert failed.data.tags["error"].startswith("InjectedFailure")
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}

    (row,) = csv.DictReader((tmp_path / "out" / "results.csv").open())
    sst2 = finished["sst2"].data.metrics["accuracy"]
    assert float(row["SST-2"]) == pytest.approx(100 * sst2, abs=1e-3) and row["RTE"] and row["SQuAD1.1-F1"]
    assert not (tmp_path / "out" / "failed_jobs.txt").exists()

    # Resume, even on another device: the same parent, nothing rerun.
    monkeypatch.delenv("SPARSEBERT_FAULTS")
    assert main([*argv, "--resume", "--device", "cpu"]) == 0
    assert "0 jobs run, 3 already recorded" in capsys.readouterr().out
    parents, again = _runs(client)
    assert [p.info.run_id for p in parents] == [pid] and len(again) == 4


@pytest.mark.slow  # a whole evaluation in a fresh interpreter
def test_no_ray_never_imports_ray(mlflow_uri, inputs, tmp_path):
    """The real entry point, in a fresh interpreter: ``-X importtime`` lists every module it imported."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "eval.run", *_argv(inputs, tmp_path / "out", "sst2")],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = set(re.findall(r"^import time:.*\|\s+(\S+)\s*$", proc.stderr, re.MULTILINE))
    assert {"torch", "mlflow", "eval.finetune"} <= imported  # the job really ran in this process
    assert not {m for m in imported if m == "ray" or m.startswith("ray.")}
    assert "1 jobs run" in proc.stdout


@needs_no_gpu
def test_cuda_without_a_gpu_fails_clearly(inputs, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    job = Job(
        str(inputs[0]),
        "sst2",
        1e-3,
        1,
        FinetuneConfig(max_steps=1, device="cuda"),
        DataSource(str(inputs[1])),
    )
    with pytest.raises(RuntimeError, match=r"device 'cuda' was asked for.*CUDA_VISIBLE_DEVICES='3'"):
        run_job(job)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


@needs_no_gpu
def test_no_ray_cuda_without_a_gpu_is_a_recorded_failure(mlflow_uri, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*_argv(inputs, tmp_path / "out", "sst2"), "--device", "cuda", "--max-retries", "0"]
    assert main(argv) == 1
    assert "FAILED after 1 attempts" in capsys.readouterr().err
    client = MlflowClient(mlflow_uri)
    (parent,), (job,) = _runs(client)
    assert parent.info.status == "FAILED" and job.info.status == "FAILED"
    assert job.data.tags["error"].startswith("RuntimeError: device 'cuda' was asked for")
    assert "CUDA_VISIBLE_DEVICES" in job.data.tags["error"] and job.data.params["device"] == "cuda"
    assert "error.txt" in {a.path for a in client.list_artifacts(job.info.run_id)}
    assert "sst2/lr=0.001/seed=1" in (tmp_path / "out" / "failed_jobs.txt").read_text()


@pytest.mark.parametrize("flags", [["--ray-address", "auto"], ["--cpus-per-job", "2", "--gpus-per-job", "1"]])
def test_ray_flags_conflict_with_no_ray(flags, inputs, tmp_path, capsys):
    assert main([*_argv(inputs, tmp_path / "out"), *flags]) == 2
    [err] = capsys.readouterr().err.splitlines()  # one line
    assert "not allowed with --no-ray" in err
    assert all(f in err for f in flags if f.startswith("--"))


def test_device_setting():
    with pytest.raises(ValueError, match=r"'device' .*must be one of"):
        FinetuneConfig(device="gpu")
    # The device is not part of the recipe: --resume may finish an evaluation on another kind of machine.
    assert evaluation_key("c", FinetuneConfig(device="cuda"), DataSource()) == evaluation_key(
        "c", FinetuneConfig(), DataSource()
    )
    # On Ray, a job given GPUs must use one; an explicit choice is kept.
    auto, cpu = Job("c", "rte", 1e-3, 1), Job("c", "rte", 1e-3, 1, FinetuneConfig(device="cpu"))
    assert device_for_ray(auto, 1).config.device == "cuda" and device_for_ray(auto, 0.5).key == auto.key
    assert device_for_ray(auto, 0).config.device == "auto" and device_for_ray(cpu, 1).config.device == "cpu"


@pytest.fixture
def reviews_task():
    """SST-2's format under a new name, scored on F1: registered as user code would, removed afterwards."""
    spec = register_task(
        replace(
            TASKS["sst2"], name="reviews", dir_name="Reviews", hub_path="", hub_config=None,
            metrics={"f1": f1_binary, "accuracy": accuracy}, headline=("f1",),
            table=TableColumns("Reviews F1", (("Reviews-F1", "f1"),)),
        )
    )  # fmt: skip
    yield spec
    del TASKS[spec.name]  # the registry is global: leave it as the other tests expect it


@pytest.mark.slow  # a whole evaluation; unit level: test_register_task_checks_the_spec
def test_registered_task_runs_end_to_end(mlflow_uri, inputs, reviews_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "tasks"
    shutil.copytree(inputs[1] / "SST-2", data / "Reviews")
    assert parse_tasks("Reviews") == ["reviews"]  # --tasks knows it too
    outcome = run_evaluation(
        EvalOptions(
            checkpoint=[str(inputs[0])], tasks=["reviews"], lrs=[1e-3], seeds=[1],
            finetune=FinetuneConfig(max_steps=2, batch_size=4, max_seq_len=32), data=DataSource(glue_dir=str(data)),
            output=str(tmp_path / "out"), ray=False,
        )
    )  # fmt: skip
    assert not outcome.failures and outcome.ran == 1

    client = MlflowClient(mlflow_uri)
    ((run_id,),) = outcome.job_runs.values()
    job = client.get_run(run_id)
    assert job.info.status == "FINISHED" and job.data.params["task"] == "reviews"
    assert {"f1", "accuracy"} <= set(job.data.metrics) and job.data.metrics["train_steps"] == 2
    f1 = job.data.metrics["f1"]
    parent = client.get_run(outcome.parent_run_ids[str(inputs[0])])
    assert parent.data.metrics["reviews/f1"] == pytest.approx(f1)
    assert parent.data.metrics["reviews/best_lr"] == pytest.approx(1e-3)

    (row,) = csv.DictReader((tmp_path / "out" / "results.csv").open())
    assert float(row["Reviews-F1"]) == pytest.approx(100 * f1, abs=1e-3) and row["SST-2"] == ""
    header, _, cells = (tmp_path / "out" / "results.md").read_text().splitlines()[:3]
    assert header.endswith("| avg | Reviews F1 |") and cells.endswith(f"| {100 * f1:.1f} |")
    assert "reviews,0.001,1,f1," in (tmp_path / "out" / "selection.csv").read_text()


def test_register_task_checks_the_spec(reviews_task):
    with pytest.raises(ValueError, match="'reviews' is taken"):
        register_task(reviews_task)
    with pytest.raises(ValueError, match="use lower case"):
        register_task(replace(reviews_task, name="Reviews2"))
    with pytest.raises(ValueError, match=r"must be among the metrics it computes"):
        replace(reviews_task, name="reviews2", headline=("spearman",))
