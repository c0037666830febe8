"""End to end on a real local Ray and a real MLflow store: parallel jobs, retries, failure reports, resume, table."""

from __future__ import annotations

import csv
import itertools
import re
import shutil
import socket
import statistics
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from eval.inputs import check_inputs
from eval.jobs import DataSource, FinetuneConfig, Job, evaluation_key, expand_jobs
from eval.options import EvalOptions
from eval.run import main
from eval.runner import parse_fail_spec, run_evaluation
from eval.smoke import write_glue, write_squad, write_tiny_checkpoint
from eval.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    dense = write_tiny_checkpoint(root / "dense", "dense")
    star = write_tiny_checkpoint(root / "star", "star", seed=1)
    (star / "mlflow_run_id").write_text("pretrain-run-123\n")  # as a pre-training export records it
    return dense, star


def _runs(client: MlflowClient, exp_id: str):
    return client.search_runs([exp_id], max_results=1000)


def _children(runs, parent_id: str, status: str):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id and r.info.status == status]


@pytest.mark.slow
def test_parallel_evaluation_retries_reports_and_resumes(
    ray_local, mlflow_uri, checkpoints, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store defaults to ./mlruns
    dense, star = checkpoints
    glue, squad = write_glue(tmp_path / "glue", n_train=16, n_dev=8), write_squad(tmp_path / "squad", 6, 4)
    # RTE's dev file loses a column on its last line, past the rows eval.run checks before it starts: every RTE
    # job fails, on every attempt.
    rte_dev = glue / "RTE" / "dev.tsv"
    header, *rows = rte_dev.read_text().splitlines(keepends=True)
    rows = (rows * 14)[:110]
    good_rte = header + "".join(rows)
    rows[-1] = rows[-1].rsplit("\t", 1)[0] + "\n"
    rte_dev.write_text(header + "".join(rows))
    bad_line = len(rows) + 1
    # SST-2 jobs fail on their first attempt only (the fault switch, set after Ray started: the driver must
    # pass it to the workers): the retry must recover them.
    monkeypatch.setenv("SPARSEBERT_FAULTS", "eval_fail=sst2:1")
    argv = [
        "--checkpoint", str(dense), str(star), "--tasks", "sst2,rte,squad_v2",
        "--glue-dir", str(glue), "--squad-dir", str(squad), "--lrs", "1e-3", "--seeds", "1,2",
        "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "32", "--squad-max-seq-len", "48",
        "--doc-stride", "16", "--max-retries", "1", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    # The pre-training run that exported `dense`, as sparsebert.pretrain tags it (in its own experiment).
    client = MlflowClient(mlflow_uri)
    pretrain = client.create_run(client.create_experiment("pretrain"), tags={"final_model_dir": str(dense)})
    assert main(argv) == 1  # some jobs still failed

    # Failed jobs are reported with the file, line and column, after one retry each.
    failed = (tmp_path / "out" / "failed_jobs.txt").read_text().splitlines()
    assert len(failed) == 4 and all("rte/lr=0.001" in f and "\t2\t" in f for f in failed)
    assert all(f"{rte_dev}: line {bad_line}, column 4" in f for f in failed)

    exp = client.get_experiment_by_name("sparsebert-eval")
    runs = _runs(client, exp.experiment_id)
    parents = {
        r.data.tags["sparsebert.train.checkpoint"]: r
        for r in runs
        if r.data.tags.get("sparsebert.kind") == "evaluation"
    }
    assert set(parents) == {str(dense), str(star)}
    assert parents[str(star)].data.tags["sparsebert.pretrain_run_id"] == "pretrain-run-123"
    assert parents[str(dense)].data.tags["sparsebert.pretrain_run_id"] == pretrain.info.run_id
    for ckpt, parent in parents.items():
        pid = parent.info.run_id
        assert parent.info.status == "FAILED"
        assert {a.path for a in client.list_artifacts(pid)} >= {"results.md", "results.csv", "selection.csv"}
        finished, failed_runs = _children(runs, pid, "FINISHED"), _children(runs, pid, "FAILED")
        assert sorted(r.data.params["task"] for r in finished) == ["squad_v2"] * 2 + ["sst2"] * 2
        assert sorted(r.data.params["task"] for r in failed_runs) == ["rte"] * 4 + ["sst2"] * 2
        for r in finished:
            assert r.data.params["lr"] == "0.001" and r.data.params["checkpoint"] == ckpt
            assert r.data.tags["ray.num_gpus"] == "0" and r.data.metrics["train_steps"] == 2
            assert r.data.tags["sparsebert.executor"] == "ray" and r.data.params["device"] == "auto"
            assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2
            if r.data.params["task"] == "sst2":
                assert r.data.tags["attempt"] == "2" and "accuracy" in r.data.metrics
            else:
                assert {"exact", "f1", "HasAns_exact", "NoAns_exact", "best_f1"} <= set(r.data.metrics)
                assert "predictions.json" in {a.path for a in client.list_artifacts(r.info.run_id)}
        rte_fail = next(r for r in failed_runs if r.data.params["task"] == "rte")
        assert (
            rte_fail.data.tags["error"].startswith("DataFormatError")
            and f"line {bad_line}, column 4" in rte_fail.data.tags["error"]
        )
        assert "error.txt" in {a.path for a in client.list_artifacts(rte_fail.info.run_id)}

    # The jobs really ran side by side: some recorded [start, end] intervals overlap.
    spans = sorted(
        (r.info.start_time, r.info.end_time)
        for r in runs
        if r.data.tags.get("sparsebert.kind") == "job" and r.info.status == "FINISHED"
    )
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans

    # The table: one row per checkpoint, numbers = medians of the nested runs read back from MLflow.
    table = {row["checkpoint"]: row for row in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    for ckpt, parent in parents.items():
        sst2 = [
            r.data.metrics["accuracy"]
            for r in _children(runs, parent.info.run_id, "FINISHED")
            if r.data.params["task"] == "sst2"
        ]
        assert float(table[ckpt]["SST-2"]) == pytest.approx(100 * statistics.median(sst2), abs=1e-3)
        assert float(table[ckpt]["sparsity"]) == pytest.approx(
            100 * parent.data.metrics["mask_sparsity"], abs=1e-3
        )
        assert table[ckpt]["RTE"] == ""
    assert float(table[str(dense)]["sparsity"]) == 0.0 and float(table[str(star)]["sparsity"]) > 50
    md = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert md[0].startswith("| mask | sparsity | MNLI m/mm | QQP |") and md[2].startswith("| dense | 0.0 |")
    assert md[3].startswith("| star | ")

    # Resume with RTE repaired: only the RTE jobs run; the finished ones are taken from MLflow.
    rte_dev.write_text(good_rte)
    monkeypatch.delenv("SPARSEBERT_FAULTS")
    assert main([*argv, "--resume"]) == 0
    runs = _runs(client, exp.experiment_id)
    assert (
        sum(r.data.tags.get("sparsebert.kind") == "evaluation" for r in runs) == 2
    )  # same parents, reopened
    for parent in parents.values():
        finished = _children(runs, parent.info.run_id, "FINISHED")
        assert (
            sorted(r.data.params["task"] for r in finished) == ["rte"] * 2 + ["squad_v2"] * 2 + ["sst2"] * 2
        )
        assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    table = {row["checkpoint"]: row for row in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    assert all(table[c]["RTE"] != "" for c in table)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_cuda_job_on_a_ray_worker_without_a_gpu_names_its_gpu_ids(ray_local):
    from eval.finetune import resolve_device

    ask = ray_local.remote(resolve_device).options(num_gpus=0, max_retries=0)
    with pytest.raises(
        ray_local.exceptions.RayTaskError, match=r"CUDA_VISIBLE_DEVICES=.*Ray assigned GPU ids \[\]"
    ):
        ray_local.get(ask.remote("cuda"))


def test_jobs_expand_and_resume_keys(tmp_path):
    cfg, data = FinetuneConfig(), DataSource(glue_dir="g")
    jobs = expand_jobs([str(tmp_path)], ["cola", "rte"], [2e-5, 3e-5], [1, 2, 3], cfg, data)
    assert len(jobs) == 12 and jobs[0].key == "cola/lr=2e-05/seed=1"
    # The eval_fail fault (SPARSEBERT_FAULTS) as the driver parses it for the jobs: task -> attempts that fail
    assert parse_fail_spec("rte:1") == {"rte": 1} and parse_fail_spec(None) == {}
    assert parse_fail_spec("rte, cola:2")["rte"] > 100 and parse_fail_spec("rte, cola:2")["cola"] == 2
    key = evaluation_key(str(tmp_path), cfg, data)
    assert key == evaluation_key(str(tmp_path), FinetuneConfig(), DataSource(glue_dir="g"))
    assert key != evaluation_key(
        str(tmp_path), FinetuneConfig(epochs=2), data
    )  # --resume never mixes recipes


@pytest.mark.slow
def test_each_job_checks_its_paths_on_its_node_and_names_both(
    ray_local, mlflow_uri, checkpoints, tmp_path, monkeypatch
):
    """What the driver checked may not be there where a job runs (a filesystem the head mounts and a worker does
    not): the job fails in one line naming its node and the path, not deep inside a library."""
    monkeypatch.chdir(tmp_path)  # MLflow's artifact store defaults to ./mlruns
    dense, _ = checkpoints
    glue = write_glue(tmp_path / "glue", n_train=8, n_dev=4)
    source = DataSource(glue_dir=str(glue))
    check_inputs([str(dense)], ["rte"], source)  # the driver sees everything
    shutil.move(glue, tmp_path / "only-on-the-head")  # ... and the jobs' node does not
    config = FinetuneConfig(max_steps=1, batch_size=4, max_seq_len=32)
    outcome = run_evaluation(
        EvalOptions(
            checkpoint=[str(dense)], tasks=["rte"], lrs=[1e-3], seeds=[1], finetune=config, data=source,
            max_retries=0, output=str(tmp_path / "out"),
        )
    )  # fmt: skip
    (failure,) = outcome.failures
    node = rf"{re.escape(socket.gethostname())} \([\d.]+\)"  # under Ray: the host and the node's address
    assert re.fullmatch(
        rf"FileNotFoundError: on node {node}: GLUE file {re.escape(str(glue))}/RTE/train\.tsv not found there",
        failure.error,
    ), failure.error

    # A checkpoint the job's node lacks: named the same way, before transformers tries it as a hub id.
    gone = Job(str(tmp_path / "runs" / "final"), "sst2", 1e-3, 1, config, DataSource(hub=True))
    from eval.finetune import run_job

    job = ray_local.remote(run_job).options(max_retries=0)
    with pytest.raises(ray_local.exceptions.RayTaskError) as raised:
        ray_local.get(job.remote(gone, 1, TASKS["sst2"]))
    assert isinstance(raised.value.cause, FileNotFoundError)
    assert re.fullmatch(
        rf"on node {node}: checkpoint {re.escape(gone.checkpoint)} not found there", str(raised.value.cause)
    )
