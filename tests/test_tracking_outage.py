"""Tracking never kills training: an MLflow that cannot be reached at start, or that dies mid-run, costs
neither a pre-training run nor an evaluation anything; the records are kept on disk and sent afterwards.

Real MLflow throughout: a dead tracking URI (a loopback port nothing listens on), a real ``mlflow server`` on
127.0.0.1 that the test kills and restarts, a port that accepts connections and never answers, sqlite stores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import PRETRAIN, REPO, all_artifacts, free_port
from mlflow import MlflowClient

from eval.jobs import DataSource, FinetuneConfig, evaluation_key
from eval.metrics import accuracy
from eval.options import EvalOptions
from eval.runner import run_evaluation
from eval.smoke import write_glue, write_tiny_checkpoint
from eval.tasks import TASKS, TableColumns, register_task
from sparsebert.track.run_log import LOCAL_ID_TAG, RunLog
from sparsebert.track.tracker import RunTracker

FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
WARNING = "WARNING: MLflow tracking failed"


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def fast_fail(monkeypatch):
    for name, value in FAST_FAIL.items():
        monkeypatch.setenv(name, value)


class Server:
    """``mlflow server`` on 127.0.0.1 with a sqlite store; killed and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "server-artifacts"),
        ]  # fmt: skip
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - the server's output, for a failing test
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    def kill(self) -> None:
        """The whole server (its process group, which this test started) at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = Server(root)
    yield srv
    srv.kill()


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _local_metrics(out: Path, key: str) -> list[tuple[int, float]]:
    records = RunLog.find(out).read()
    return sorted(
        (r["step"], r["metrics"][key]) for r in records if r["kind"] == "metrics" and key in r["metrics"]
    )


def _resync(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **FAST_FAIL, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sparsebert.track.resync", str(out), *args]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)


# --- pre-training ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_pretraining_with_a_dead_tracking_uri_completes_and_resyncs(pretrain_corpus, tmp_path):
    out = tmp_path / "demo"
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(PRETRAIN),
        "--config", "tiny_cpu", "model.max_position_embeddings=64",
        "model.attention_pattern={name: dam_s, lambda: 0.01}", "train.max_steps=4", "dam.search_steps=2",
        "train.micro_batch_size=4", "train.log_every=1", "checkpoint.every=2", "mlflow.experiment=outage",
        "deepspeed_config=ds_configs/cpu.json", f"data.path={pretrain_corpus}", f"output_dir={out}",
    ]  # fmt: skip
    env = {**os.environ, **FAST_FAIL, "MLFLOW_TRACKING_URI": _dead_uri(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    (tmp_path / "launch.log").write_text(output)
    assert result.returncode == 0, output[-4000:]
    assert output.count(WARNING) == 1, output[-4000:]  # one warning, however many records failed
    assert f"python -m sparsebert.track.resync {out}" in output

    # Everything is on disk: params, every step's metrics, tags, the artifact files, the end.
    records = RunLog.find(out).read()
    assert [r["kind"] for r in records][:2] == ["start", "params"]
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "FINISHED"
    params = next(r["params"] for r in records if r["kind"] == "params")
    assert params["world_size"] == "2" and params["train.max_steps"] == "4"
    losses = _local_metrics(out, "loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert _local_metrics(out, "frozen_sparsity")[0][0] == 2
    tags = {k: v for r in records if r["kind"] == "tags" for k, v in r["tags"].items()}
    assert tags["final_model_dir"] == str((out / "final").resolve())
    artifacts = out / "tracking" / "artifacts"
    for path in ("config/train.yaml", "config/deepspeed.json", "masks/stage1_frozen/mask.safetensors",
                 "masks/stage1_frozen/importance_by_distance.png", "masks/final/mask.safetensors"):  # fmt: skip
        assert (artifacts / path).is_file(), path
    local_id = records[0]["local_id"]
    assert (out / "final" / "mlflow_run_id").read_text() == local_id  # MLflow never gave the run an id

    # One command sends the run to a working store; a second sends nothing, and even sending everything again
    # (--full) adds no metric point: the SQL store keeps one copy of a point with the same step and timestamp.
    uri = f"sqlite:///{tmp_path / 'recovered.db'}"
    for args, sent in (((), len(records)), ((), 0), (("--full",), len(records))):
        resynced = _resync(out, "--tracking-uri", uri, *args)
        assert resynced.returncode == 0, resynced.stderr[-3000:]
        assert f"{sent} records sent" in resynced.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert (
        run.data.tags[LOCAL_ID_TAG] == local_id
        and run.data.tags["final_model_dir"] == tags["final_model_dir"]
    )
    assert run.data.params["world_size"] == "2" and run.data.params["attention.stage2.backend"]
    assert _history(client, run_id, "loss") == losses
    assert len(client.get_metric_history(run_id, "mlm_loss")) == 4
    assert {
        "config/train.yaml", "config/deepspeed.json", "masks/stage1_frozen/mask.safetensors",
        "masks/stage1_frozen/mask_layer0.png", "masks/final/mask.safetensors",
    } <= all_artifacts(client, run_id)  # fmt: skip


@pytest.mark.slow  # a real mlflow server started twice and killed; unit level: the dead-URI tests
def test_tracker_outlives_a_server_that_dies_mid_run(server, fast_fail, tmp_path, capfd):
    server.start()
    out = tmp_path / "run"
    tracker = RunTracker(True, out, start_wait=60)
    tracker.start(server.uri, "mid-run", "mid", None, {"lr": 0.1})
    run_id = tracker.run_id
    assert run_id and not run_id.startswith("local-")
    client = MlflowClient(server.uri)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1 / step}, step)
    deadline = time.time() + 60
    while len(client.get_metric_history(run_id, "loss")) < 3 and time.time() < deadline:
        time.sleep(0.2)
    server.kill()

    began = time.time()
    for step in (4, 5, 6):
        tracker.log_metrics({"loss": 1 / step}, step)
    tracker.log_mask("final", torch.ones(2, 2, 8, 8, dtype=torch.bool))
    tracker.set_tags({"done": "yes"})
    assert time.time() - began < 2, "logging waited on the dead server"
    tracker.end()
    assert time.time() - began < 30
    assert capfd.readouterr().err.count(WARNING) == 1
    assert [s for s, _ in _local_metrics(out, "loss")] == [1, 2, 3, 4, 5, 6]

    # Back up: the resync continues the same MLflow run (the URI it was given), sending what it missed once.
    server.start()
    resynced = _resync(out)
    assert resynced.returncode == 0, resynced.stderr[-3000:]
    assert f"MLflow run {run_id} at {server.uri}" in resynced.stdout
    run = client.get_run(run_id)
    assert _history(client, run_id, "loss") == [(s, 1 / s) for s in range(1, 7)]
    assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes" and run.data.params["lr"] == "0.1"
    assert "masks/final/mask.safetensors" in all_artifacts(client, run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_resumed_run_sends_what_an_earlier_process_could_not(fast_fail, tmp_path):
    out, dead = tmp_path / "run", _dead_uri()
    first = RunTracker(True, out)
    first.start(dead, "resumed", "r", None, {"output_dir": str(out), "seed": 1})
    local_id = first.run_id
    assert local_id.startswith("local-")
    first.log_metrics({"loss": 1.0}, 1)
    first.log_metrics({"loss": 0.5}, 2)  # ... and the process dies (no end())

    # Restarted (from its checkpoint, which holds the local id) with a working store.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = RunTracker(True, out)
    second.start(uri, "resumed", "r", local_id, {"output_dir": str(out), "seed": 1})
    second.log_metrics({"loss": 0.25}, 3)
    second.end()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.data.tags[LOCAL_ID_TAG] == local_id and run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert run.data.params["seed"] == "1"
    assert "0 records sent" in _resync(out, "--tracking-uri", uri).stdout

    # A fresh run in the same output_dir (nothing to resume) starts new records; the old ones are kept aside.
    third = RunTracker(True, out)
    third.start(uri, "resumed", "r2", None, {"output_dir": str(out)})
    third.end()
    assert third.run_id != run.info.run_id
    (aside,) = tmp_path.glob("run/tracking.*")
    assert len(RunLog(aside).read()) == 7 and len(RunLog.find(out).read()) == 3


HANGING = textwrap.dedent(
    """
    import sys, time
    from sparsebert.track.tracker import RunTracker

    uri, out, mode = sys.argv[1:]
    tracker = RunTracker(True, out, start_wait=1, end_wait=2)
    began = time.time()
    tracker.start(uri, "hang", "h", None, {"output_dir": out})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    print(f"logged in {time.time() - began:.1f} s", flush=True)
    if mode == "end":
        tracker.end()
        print(f"ended in {time.time() - began:.1f} s", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["end", "exit"])
def test_a_hanging_server_neither_blocks_end_nor_keeps_the_process_alive(mode, tmp_path):
    """The port accepts connections and never answers (requests would wait 60 s each): ``end()`` returns after
    its bounded wait, and a process that never calls it still exits; every record is on disk."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        uri, out = f"http://127.0.0.1:{hole.getsockname()[1]}", tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
        began = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", HANGING, uri, str(out), mode],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.time() - began
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 45, f"the process took {took:.0f} s to end"
    assert float(proc.stdout.split("logged in ")[1].split()[0]) < 5
    if mode == "end":
        assert float(proc.stdout.split("ended in ")[1].split()[0]) < 10
        assert "did not take this run's last" in proc.stderr
    assert [s for s, _ in _local_metrics(out, "loss")] == [1, 2, 3]


# --- evaluation --------------------------------------------------------------------------------------------


@pytest.fixture
def outage_task(server):
    """SST-2's data under a new name whose metric kills the MLflow server: the job of this task finishes after
    MLflow died, the job before it was recorded while it was up."""

    def accuracy_then_outage(predictions, labels):
        server.kill()
        return accuracy(predictions, labels)

    spec = register_task(
        replace(
            TASKS["sst2"], name="outage", dir_name="Outage", hub_path="", hub_config=None,
            metrics={"accuracy": accuracy_then_outage}, headline=("accuracy",),
            table=TableColumns("Outage", (("Outage", "accuracy"),)),
        )
    )  # fmt: skip
    yield spec
    del TASKS[spec.name]


@pytest.mark.slow  # evaluations against a real mlflow server killed mid-run
def test_evaluation_survives_mlflow_dying_and_resume_records_the_rest(
    server, outage_task, fast_fail, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    glue = write_glue(tmp_path / "glue", n_train=16, n_dev=8)
    shutil.copytree(glue / "SST-2", glue / "Outage")
    ckpt = str(write_tiny_checkpoint(tmp_path / "dense", "dense"))
    config, data = FinetuneConfig(max_steps=2, batch_size=4, max_seq_len=32), DataSource(glue_dir=str(glue))
    out = tmp_path / "out"

    def evaluate(uri: str, resume: bool):
        return run_evaluation(
            EvalOptions(
                checkpoint=[ckpt], tasks=["sst2", "outage", "rte"], lrs=[1e-3], seeds=[1], finetune=config,
                data=data, tracking_uri=uri, resume=resume, output=str(out), ray=False,
            )
        )  # fmt: skip

    server.start()
    outcome = evaluate(server.uri, resume=False)
    assert not outcome.failures and outcome.ran == 3 and outcome.tracking_error
    assert sum("MLflow failed" in r.getMessage() for r in caplog.records) == 1
    saved = sorted(p.name for p in (out / "jobs" / evaluation_key(ckpt, config, data)).glob("*.json"))
    assert saved == [
        "outage__lr=0.001__seed=1.json",
        "rte__lr=0.001__seed=1.json",
        "sst2__lr=0.001__seed=1.json",
    ]
    table = (out / "results.csv").read_text()
    assert all(column in table for column in ("SST-2", "RTE", "Outage"))
    (row,) = outcome.rows
    assert set(row.summaries) == {"sst2", "outage", "rte"}  # the table holds the jobs MLflow never saw

    # MLflow back (the same store): --resume runs nothing, records the two jobs it missed, closes the parent.
    server.start()
    resumed = evaluate(server.uri, resume=True)
    assert (
        resumed.ran == 0 and resumed.skipped == 3 and not resumed.failures and resumed.tracking_error is None
    )
    assert (out / "results.csv").read_text() == table
    client = MlflowClient(server.uri)
    (parent_id,) = resumed.parent_run_ids.values()
    assert parent_id == outcome.parent_run_ids[ckpt]  # the parent created before MLflow died
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "outage/accuracy" in parent.data.metrics
    jobs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.data.params["task"] for r in jobs) == ["outage", "rte", "sst2"]
    assert all(r.info.status == "FINISHED" for r in jobs)
    entries = [json.loads(p.read_text()) for p in (out / "jobs").glob("*/*.json")]
    assert all(e["mlflow"] and e["mlflow"]["parent_run_id"] == parent_id for e in entries)

    # Into a store that never heard of it: a new parent, every job recorded from disk, nothing rerun.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    again = evaluate(fresh, resume=True)
    assert again.ran == 0 and again.skipped == 3 and (out / "results.csv").read_text() == table
    client = MlflowClient(fresh)
    runs = client.search_runs([client.get_experiment_by_name("sparsebert-eval").experiment_id])
    assert sorted(r.data.tags["sparsebert.kind"] for r in runs) == ["evaluation", "job", "job", "job"]
