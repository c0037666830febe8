"""End to end on a real local Ray and a real MLflow store: parallel jobs, retries, failure reports, resume, table."""

from __future__ import annotations

import csv
import itertools
import re
import shutil
import socket
import statistics
from dataclasses import dataclass
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


def _table(out: Path) -> dict[str, dict[str, str]]:
    return {row["checkpoint"]: row for row in csv.DictReader((out / "results.csv").open())}


def _break_rte(glue: Path) -> tuple[Path, str, int]:
    """RTE's dev file loses a column on its last line, past the rows eval.run checks before it starts: every RTE
    job fails, on every attempt. Returns the file, its repaired content and the bad line's number."""
    rte_dev = glue / "RTE" / "dev.tsv"
    header, *rows = rte_dev.read_text().splitlines(keepends=True)
    rows = (rows * 14)[:110]
    good_rte = header + "".join(rows)
    rows[-1] = rows[-1].rsplit("\t", 1)[0] + "\n"
    rte_dev.write_text(header + "".join(rows))
    return rte_dev, good_rte, len(rows) + 1


@dataclass
class Evaluation:
    """One evaluation with failures (RTE broken, SST-2 failing once) and its resume with RTE repaired: what each
    left, read back from MLflow and the output folder."""

    dense: Path
    star: Path
    out: Path
    client: MlflowClient
    pretrain_run_id: str
    rte_dev: Path
    bad_line: int
    code: int
    failed_jobs: list[str]  # failed_jobs.txt after the first run (the resume, with none, removes it)
    runs: list  # after the first run
    parents: dict  # checkpoint -> its evaluation run, after the first run
    table: dict[str, dict[str, str]]
    markdown: list[str]
    resumed_code: int
    resumed_runs: list
    resumed_table: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def evaluation(ray_local, checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    dense, star = checkpoints
    glue, squad = write_glue(root / "glue", n_train=16, n_dev=8), write_squad(root / "squad", 6, 4)
    rte_dev, good_rte, bad_line = _break_rte(glue)
    out = root / "out"
    argv = [
        "--checkpoint", str(dense), str(star), "--tasks", "sst2,rte,squad_v2",
        "--glue-dir", str(glue), "--squad-dir", str(squad), "--lrs", "1e-3", "--seeds", "1,2",
        "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "32", "--squad-max-seq-len", "48",
        "--doc-stride", "16", "--max-retries", "1", "--output", str(out),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow's artifact store defaults to ./mlruns
        mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        # SST-2 jobs fail on their first attempt only (the fault switch, set after Ray started: the driver must
        # pass it to the workers): the retry must recover them.
        patch.setenv("SPARSEBERT_FAULTS", "eval_fail=sst2:1")
        # The pre-training run that exported `dense`, as sparsebert.pretrain tags it (in its own experiment).
        client = MlflowClient(mlflow_uri)
        pretrain = client.create_run(
            client.create_experiment("pretrain"), tags={"final_model_dir": str(dense)}
        )
        code = main(argv)
        exp_id = client.get_experiment_by_name("sparsebert-eval").experiment_id
        runs = _runs(client, exp_id)
        parents = {
            r.data.tags["sparsebert.train.checkpoint"]: r
            for r in runs
            if r.data.tags.get("sparsebert.kind") == "evaluation"
        }
        table, markdown = _table(out), (out / "results.md").read_text().splitlines()
        failed_jobs = (out / "failed_jobs.txt").read_text().splitlines()
        # Resume with RTE repaired: only the RTE jobs run; the finished ones are taken from MLflow.
        rte_dev.write_text(good_rte)
        patch.delenv("SPARSEBERT_FAULTS")
        resumed_code = main([*argv, "--resume"])
        yield Evaluation(
            dense, star, out, client, pretrain.info.run_id, rte_dev, bad_line, code, failed_jobs, runs, parents,
            table, markdown, resumed_code, _runs(client, exp_id), _table(out),
        )  # fmt: skip


@pytest.mark.slow
def test_failed_jobs_are_reported_with_file_line_and_column_after_one_retry(evaluation):
    assert evaluation.code == 1  # some jobs still failed
    failed = evaluation.failed_jobs
    assert len(failed) == 4 and all("rte/lr=0.001" in f and "\t2\t" in f for f in failed)
    assert all(f"{evaluation.rte_dev}: line {evaluation.bad_line}, column 4" in f for f in failed)


def _check_finished_job(client: MlflowClient, run, checkpoint: str) -> None:
    assert run.data.params["lr"] == "0.001" and run.data.params["checkpoint"] == checkpoint
    assert run.data.tags["ray.num_gpus"] == "0" and run.data.metrics["train_steps"] == 2
    assert run.data.tags["sparsebert.executor"] == "ray" and run.data.params["device"] == "auto"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    if run.data.params["task"] == "sst2":  # recovered by the retry
        assert run.data.tags["attempt"] == "2" and "accuracy" in run.data.metrics
    else:
        assert {"exact", "f1", "HasAns_exact", "NoAns_exact", "best_f1"} <= set(run.data.metrics)
        assert "predictions.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_each_checkpoint_has_an_evaluation_run_nesting_its_jobs(evaluation):
    client, parents, bad_line = evaluation.client, evaluation.parents, evaluation.bad_line
    assert set(parents) == {str(evaluation.dense), str(evaluation.star)}
    assert parents[str(evaluation.star)].data.tags["sparsebert.pretrain_run_id"] == "pretrain-run-123"
    assert (
        parents[str(evaluation.dense)].data.tags["sparsebert.pretrain_run_id"] == evaluation.pretrain_run_id
    )
    for ckpt, parent in parents.items():
        pid = parent.info.run_id
        assert parent.info.status == "FAILED"
        assert {a.path for a in client.list_artifacts(pid)} >= {"results.md", "results.csv", "selection.csv"}
        finished = _children(evaluation.runs, pid, "FINISHED")
        failed_runs = _children(evaluation.runs, pid, "FAILED")
        assert sorted(r.data.params["task"] for r in finished) == ["squad_v2"] * 2 + ["sst2"] * 2
        assert sorted(r.data.params["task"] for r in failed_runs) == ["rte"] * 4 + ["sst2"] * 2
        for run in finished:
            _check_finished_job(client, run, ckpt)
        rte_fail = next(r for r in failed_runs if r.data.params["task"] == "rte")
        error = rte_fail.data.tags["error"]
        assert error.startswith("DataFormatError") and f"line {bad_line}, column 4" in error
        assert "error.txt" in {a.path for a in client.list_artifacts(rte_fail.info.run_id)}


@pytest.mark.slow
def test_the_jobs_ran_side_by_side(evaluation):
    """Some recorded [start, end] intervals of finished jobs overlap."""
    spans = sorted(
        (r.info.start_time, r.info.end_time)
        for r in evaluation.runs
        if r.data.tags.get("sparsebert.kind") == "job" and r.info.status == "FINISHED"
    )
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans


@pytest.mark.slow
def test_the_table_has_a_row_per_checkpoint_of_medians_read_back_from_mlflow(evaluation):
    table, dense, star = evaluation.table, str(evaluation.dense), str(evaluation.star)
    for ckpt, parent in evaluation.parents.items():
        sst2 = [
            r.data.metrics["accuracy"]
            for r in _children(evaluation.runs, parent.info.run_id, "FINISHED")
            if r.data.params["task"] == "sst2"
        ]
        assert float(table[ckpt]["SST-2"]) == pytest.approx(100 * statistics.median(sst2), abs=1e-3)
        assert float(table[ckpt]["sparsity"]) == pytest.approx(
            100 * parent.data.metrics["mask_sparsity"], abs=1e-3
        )
        assert table[ckpt]["RTE"] == ""
    assert float(table[dense]["sparsity"]) == 0.0 and float(table[star]["sparsity"]) > 50
    md = evaluation.markdown
    assert md[0].startswith("| mask | sparsity | MNLI m/mm | QQP |") and md[2].startswith("| dense | 0.0 |")
    assert md[3].startswith("| star | ")


@pytest.mark.slow
def test_resume_runs_only_the_failed_jobs_under_the_same_evaluation_runs(evaluation):
    runs = evaluation.resumed_runs
    assert evaluation.resumed_code == 0
    assert sum(r.data.tags.get("sparsebert.kind") == "evaluation" for r in runs) == 2  # the same, reopened
    for parent in evaluation.parents.values():
        finished = _children(runs, parent.info.run_id, "FINISHED")
        tasks = sorted(r.data.params["task"] for r in finished)
        assert tasks == ["rte"] * 2 + ["squad_v2"] * 2 + ["sst2"] * 2
        assert evaluation.client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert all(row["RTE"] != "" for row in evaluation.resumed_table.values())


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
