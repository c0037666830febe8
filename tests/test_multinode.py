"""Two nodes simulated on one machine (``tests/multinode.py``): each node is its own ``deepspeed --no_ssh
--node_rank N`` launcher with its own HOME, cache, TMPDIR and working directory, one CPU rank each, and reads
its own copy of the corpus (``data.path=data/corpus``, relative; or the embedded corpus in its own cache).

* ``output_dir`` on the "shared filesystem", the embedded corpus (each node prepares it in its own cache): both
  nodes train and export;
* corpus (that one, uploaded) and ``output_dir`` in object storage (a local S3 server), nothing shared but the
  bucket: SIGTERM on node 1 checkpoints both nodes, the same command on nodes whose caches were emptied resumes
  both, to the uninterrupted run's samples and weights, and exports into the bucket;
* ``output_dir`` relative, so each node's own disk: every node stops at set-up, naming output_dir and its path on
  each node (before, rank 0 resumed while rank 1 started afresh, and both hung);
* node 1 without its copy of the corpus: every node stops, node 1 naming data.path (before, node 0 hung);
* node 1 never started: node 0 stops after the set-up timeout, naming the missing rank.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import error_lines, s3_objects
from multinode import Node, SimulatedCluster
from safetensors.torch import load_file

from sparsebert import SparseBertForPreTraining

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 120  # every node exits on its own within this, or the test fails
TINY = [
    "--config", "tiny_cpu", "model.max_position_embeddings=64", "train.max_steps=6", "dam.search_steps=3",
    "train.micro_batch_size=4", "train.warmup_steps=1", "eval.every=0", "eval.max_batches=2",
    "checkpoint.every=2", "mlflow.enabled=false", "train.log_every=1", "data.log_sample_ids=true",
    "deepspeed_config=ds_configs/cpu_zero2.json",  # each rank writes its own optimizer partition
]  # fmt: skip
LOCAL_COPY = "data.path=data/corpus"  # each node's own copy, in its working directory
SIGTERM_ON_NODE_1 = {1: {"SPARSEBERT_FAULTS": "sigterm_at_step=3"}}  # node 1's rank, after step 3
EMBEDDED = "python-docs-seq64-v2"  # the embedded corpus in a node's cache


@pytest.fixture
def cluster(tmp_path):
    with SimulatedCluster(tmp_path, nodes=2) as nodes:
        yield nodes


@dataclass
class Launch:
    """What one launch of every node left: exit statuses, outputs, and the transcript for failure messages."""

    codes: list[int | None]
    outputs: list[str]
    transcript: str


def _launch(cluster: SimulatedCluster, args: list[str], **kwargs) -> Launch:
    cluster.run(args, STOP_WITHIN_S * 3, **kwargs)
    return Launch(
        [n.returncode for n in cluster.nodes], [n.output for n in cluster.nodes], cluster.transcript()
    )


@dataclass
class SharedRun:
    out: Path
    nodes: list[Node]
    launch: Launch


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> SharedRun:
    """``output_dir`` on the shared filesystem, the embedded corpus, uninterrupted: the reference of the
    object-storage case, which is stopped and resumed."""
    root = tmp_path_factory.mktemp("shared_run")
    out = root / "shared" / "run"  # every node sees this path: the shared filesystem
    with SimulatedCluster(root / "cluster", nodes=2) as cluster:
        return SharedRun(out, cluster.nodes, _launch(cluster, [*TINY, f"output_dir={out}"]))


def test_a_shared_output_dir_trains_and_exports_on_both_nodes(shared_run):
    out, launch = shared_run.out, shared_run.launch
    assert launch.codes == [0, 0], launch.transcript
    for node, output in zip(shared_run.nodes, launch.outputs, strict=True):  # each prepared it in its cache
        assert output.count("preparing the embedded corpus") == 1, output
        assert (node.cache / EMBEDDED / "manifest.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert SparseBertForPreTraining.from_pretrained(out / "final").config.attention_pattern["frozen"]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "final").rglob("*"):  # readable by colleagues: what the umask allows, not 0600
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert not (shared_run.nodes[1].work / "runs").exists()  # nothing went to node 1's own disk


@dataclass
class BucketRun:
    """The object-storage case: what the bucket held after the stop and after the resume, and both launches."""

    out: str
    stopped: Launch
    after_stop: dict[str, bytes]
    resumed: Launch
    after_resume: dict[str, bytes]
    mlflow_uri: str
    nodes_wrote_locally: bool


@pytest.fixture(scope="module")
def bucket_run(shared_run, s3_server, tmp_path_factory) -> BucketRun:
    """Corpus (the embedded one, uploaded) and output_dir in S3: SIGTERM on node 1 at step 3, then the same
    command on nodes whose caches were emptied (other machines). One pair of launches for the tests below."""
    from sparsebert import storage

    assert shared_run.launch.codes == [0, 0], shared_run.launch.transcript  # the reference
    root = tmp_path_factory.mktemp("bucket_run")
    with pytest.MonkeyPatch.context() as patch:
        bucket = s3_server.use(patch)
        corpus, out = f"s3://{bucket}/corpora/docs", f"s3://{bucket}/runs/two"
        storage.upload(shared_run.nodes[0].cache / EMBEDDED, storage.parse(corpus, "the corpus"))
        args = [*TINY, f"data.path={corpus}", f"output_dir={out}", "mlflow.enabled=true"]
        mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        with SimulatedCluster(root / "cluster", nodes=2, env={"MLFLOW_TRACKING_URI": mlflow_uri}) as cluster:
            stopped = _launch(cluster, args, node_env=SIGTERM_ON_NODE_1)
            after_stop = s3_objects(bucket, "runs/two/")
            for node in cluster.nodes:  # other machines: nothing of the first launch stays
                shutil.rmtree(node.cache)
                node.cache.mkdir()
            resumed = _launch(cluster, args)
            wrote_locally = any((node.work / "s3:").exists() for node in cluster.nodes)
        return BucketRun(
            out, stopped, after_stop, resumed, s3_objects(bucket, "runs/two/"), mlflow_uri, wrote_locally
        )


def test_in_object_storage_a_stop_on_one_node_checkpoints_both_into_the_bucket(bucket_run):
    stopped, stored = bucket_run.stopped, bucket_run.after_stop
    assert stopped.codes == [0, 0], stopped.transcript
    assert "stopped by a stop signal on another rank at step 3" in stopped.outputs[0], stopped.transcript
    assert stored["checkpoints/latest"] == b"step00000003" and ".lease" not in stored, sorted(stored)
    parts = {k.split("/")[-1] for k in stored if k.startswith("checkpoints/step00000003/")}
    assert {"rng_rank0.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt", "train_state.json"} <= parts
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= parts  # one from each node


def test_in_object_storage_nodes_with_empty_caches_resume_exactly_from_the_bucket(bucket_run, shared_run):
    """The resumed run reads the uninterrupted shared-filesystem run's samples, sharing nothing but the bucket."""
    resumed, stored = bucket_run.resumed, bucket_run.after_resume
    assert resumed.codes == [0, 0], resumed.transcript
    assert "resumed from step00000003 at step 3" in resumed.outputs[0], resumed.transcript
    assert not bucket_run.nodes_wrote_locally
    assert ".lease" not in stored and stored["checkpoints/latest"] == b"step00000006"
    steps = sorted({k.split("/")[1] for k in stored if k.startswith("checkpoints/step")})
    assert steps == ["step00000004", "step00000006"]
    for rank in (0, 1):  # the samples each step read: those of the uninterrupted run
        local = (shared_run.out / f"samples.rank{rank}.jsonl").read_text().splitlines()
        remote = stored[f"samples.rank{rank}.jsonl"].decode().splitlines()
        assert {r["step"]: r["ids"] for r in map(json.loads, remote)} == {
            r["step"]: r["ids"] for r in map(json.loads, local)
        }
    assert b'"kind": "end"' in stored["tracking/records.jsonl"]


def test_in_object_storage_the_export_in_the_bucket_has_the_uninterrupted_weights(
    bucket_run, shared_run, tmp_path
):
    final = tmp_path / "final"
    for key, data in bucket_run.after_resume.items():
        if key.startswith("final/"):
            (final / key.removeprefix("final/")).parent.mkdir(parents=True, exist_ok=True)
            (final / key.removeprefix("final/")).write_bytes(data)
    weights = load_file(final / "model.safetensors")
    expected = load_file(shared_run.out / "final/model.safetensors")
    assert weights.keys() == expected.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-4, atol=1e-5)
    assert SparseBertForPreTraining.from_pretrained(final).config.attention_pattern["frozen"]


def test_in_object_storage_the_resume_continues_the_mlflow_run(bucket_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(bucket_run.mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("sparsebert-pretrain").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["final_model_dir"] == f"{bucket_run.out}/final"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 7))


def test_an_output_dir_that_is_not_shared_stops_every_node_naming_it(cluster, pretrain_corpus):
    cluster.copy_to_nodes(pretrain_corpus, "data/corpus")
    cluster.run([*TINY, LOCAL_COPY, "output_dir=runs/x"], STOP_WITHIN_S)  # relative: each node's own disk
    assert not any(node.timed_out for node in cluster.nodes), cluster.transcript()
    assert all(node.returncode != 0 for node in cluster.nodes), cluster.transcript()
    paths = [str(node.work / "runs" / "x") for node in cluster.nodes]
    for node in cluster.nodes:
        [error] = error_lines(node.output)  # one line per node, the same reason
        assert "output_dir 'runs/x' is not one directory shared by every node" in error, cluster.transcript()
        assert all(path in error for path in paths) and "absolute path" in error
        assert "Traceback" not in node.output
    assert not (cluster.nodes[1].work / "runs").exists()
    assert not (cluster.nodes[0].work / "runs" / "x" / "checkpoints").exists()  # stopped before any step


def test_a_node_missing_its_corpus_stops_every_node_and_names_the_path(cluster, pretrain_corpus, tmp_path):
    cluster.copy_to_nodes(pretrain_corpus, "data/corpus", nodes=[0])
    cluster.run([*TINY, LOCAL_COPY, f"output_dir={tmp_path / 'shared' / 'run'}"], STOP_WITHIN_S)
    assert not any(node.timed_out for node in cluster.nodes), cluster.transcript()
    assert all(node.returncode != 0 for node in cluster.nodes), cluster.transcript()
    [own] = error_lines(cluster.nodes[1].output)
    assert "data.path 'data/corpus'" in own and "not found" in own, cluster.transcript()
    [told] = error_lines(cluster.nodes[0].output)
    assert told.startswith("error: rank 1 (node_rank 1, host ") and "data.path 'data/corpus'" in told, told
    assert not any("Traceback" in node.output for node in cluster.nodes), cluster.transcript()


def test_a_node_that_never_arrives_stops_the_others_after_the_set_up_timeout(
    cluster, pretrain_corpus, tmp_path
):
    cluster.copy_to_nodes(pretrain_corpus, "data/corpus")
    args = [*TINY, LOCAL_COPY, f"output_dir={tmp_path / 'run'}"]
    cluster.start(args, nodes=[0], env={"SPARSEBERT_SETUP_TIMEOUT": "5"})
    cluster.wait(STOP_WITHIN_S)
    node = cluster.nodes[0]
    assert not node.timed_out and node.returncode != 0, cluster.transcript()
    [error] = error_lines(node.output)
    assert "only 1 of 2 ranks joined" in error and "missing: rank 1" in error, error
