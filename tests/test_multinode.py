"""Two nodes simulated on one machine (``tests/multinode.py``): each node is its own ``deepspeed --no_ssh
--node_rank N`` launcher with its own HOME, cache, TMPDIR and working directory, one CPU rank each, and reads
its own copy of the corpus (``data.path=data/corpus``, relative; or the embedded corpus in its own cache).

* ``output_dir`` on the "shared filesystem", the embedded corpus (each node prepares it in its own cache): SIGTERM
  on node 1 checkpoints both nodes, the same command resumes both and exports;
* ``output_dir`` relative, so each node's own disk: every node stops at set-up, naming output_dir and its path on
  each node (before, rank 0 resumed while rank 1 started afresh, and both hung);
* node 1 without its copy of the corpus: every node stops, node 1 naming data.path (before, node 0 hung);
* node 1 never started: node 0 stops after the set-up timeout, naming the missing rank.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from multinode import SimulatedCluster

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 120  # every node exits on its own within this, or the test fails
TINY = [
    "--config", "tiny_cpu", "model.max_position_embeddings=64", "train.max_steps=6", "dam.search_steps=3",
    "train.micro_batch_size=4", "train.warmup_steps=1", "eval.every=0", "eval.max_batches=2",
    "checkpoint.every=2", "mlflow.enabled=false",
]  # fmt: skip
LOCAL_COPY = "data.path=data/corpus"  # each node's own copy, in its working directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_local) -> Path:
    import random

    from data_prep import prepare_corpus

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    vocab = [
        f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "po", "ra", "si", "tu") for b in ("n", "r", "s", "t", "")
    ]
    docs = [
        " ".join(" ".join(rng.choices(vocab, k=6 + (d + s) % 9)).capitalize() + "." for s in range(12))
        for d in range(60)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    out = root / "prepared"
    prepare_corpus(
        [root / "docs.txt"], out, vocab_size=300, seq_len=64, seed=0, shard_size=64, progress=False
    )
    return out


@pytest.fixture
def cluster(tmp_path):
    with SimulatedCluster(tmp_path, nodes=2) as nodes:
        yield nodes


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_shared_output_dir_stops_resumes_and_exports_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "shared" / "run"  # every node sees this path: the shared filesystem
    sigterm = {1: {"SPARSEBERT_FAULTS": "sigterm_at_step=3"}}  # node 1's rank, after step 3
    cluster.run([*TINY, f"output_dir={out}"], STOP_WITHIN_S * 3, node_env=sigterm)
    assert [n.returncode for n in cluster.nodes] == [0, 0], cluster.transcript()
    assert "stopped by a stop signal on another rank at step 3" in cluster.nodes[0].output, (
        cluster.transcript()
    )
    assert (out / "checkpoints" / "latest").read_text() == "step00000003" and not (out / "final").exists()
    for node in cluster.nodes:  # each node prepared the embedded corpus in its own cache
        assert node.output.count("preparing the embedded corpus") == 1, node.output
        assert (node.cache / "python-docs-seq64-v2" / "manifest.json").is_file()

    cluster.run([*TINY, f"output_dir={out}"], STOP_WITHIN_S * 3)
    assert [n.returncode for n in cluster.nodes] == [0, 0], cluster.transcript()
    assert "resumed from step00000003 at step 3" in cluster.nodes[0].output
    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    from sparsebert import SparseBertForPreTraining

    assert SparseBertForPreTraining.from_pretrained(out / "final").config.attention_pattern["frozen"]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "final").iterdir():  # readable by colleagues: what the umask allows, not 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert not (cluster.nodes[1].work / "runs").exists()  # nothing went to node 1's own disk
    assert not any("preparing the embedded corpus" in node.output for node in cluster.nodes)  # cached


def test_an_output_dir_that_is_not_shared_stops_every_node_naming_it(cluster, corpus):
    cluster.copy_to_nodes(corpus, "data/corpus")
    cluster.run([*TINY, LOCAL_COPY, "output_dir=runs/x"], STOP_WITHIN_S)  # relative: each node's own disk
    assert not any(node.timed_out for node in cluster.nodes), cluster.transcript()
    assert all(node.returncode != 0 for node in cluster.nodes), cluster.transcript()
    paths = [str(node.work / "runs" / "x") for node in cluster.nodes]
    for node in cluster.nodes:
        [error] = _errors(node.output)  # one line per node, the same reason
        assert "output_dir 'runs/x' is not one directory shared by every node" in error, cluster.transcript()
        assert all(path in error for path in paths) and "absolute path" in error
        assert "Traceback" not in node.output
    assert not (cluster.nodes[1].work / "runs").exists()
    assert not (cluster.nodes[0].work / "runs" / "x" / "checkpoints").exists()  # stopped before any step


def test_a_node_missing_its_corpus_stops_every_node_and_names_the_path(cluster, corpus, tmp_path):
    cluster.copy_to_nodes(corpus, "data/corpus", nodes=[0])
    cluster.run([*TINY, LOCAL_COPY, f"output_dir={tmp_path / 'shared' / 'run'}"], STOP_WITHIN_S)
    assert not any(node.timed_out for node in cluster.nodes), cluster.transcript()
    assert all(node.returncode != 0 for node in cluster.nodes), cluster.transcript()
    [own] = _errors(cluster.nodes[1].output)
    assert "data.path 'data/corpus'" in own and "not found" in own, cluster.transcript()
    [told] = _errors(cluster.nodes[0].output)
    assert told.startswith("error: rank 1 (node_rank 1, host ") and "data.path 'data/corpus'" in told, told
    assert not any("Traceback" in node.output for node in cluster.nodes), cluster.transcript()


def test_a_node_that_never_arrives_stops_the_others_after_the_set_up_timeout(cluster, corpus, tmp_path):
    cluster.copy_to_nodes(corpus, "data/corpus")
    args = [*TINY, LOCAL_COPY, f"output_dir={tmp_path / 'run'}"]
    cluster.start(args, nodes=[0], env={"SPARSEBERT_SETUP_TIMEOUT": "5"})
    cluster.wait(STOP_WITHIN_S)
    node = cluster.nodes[0]
    assert not node.timed_out and node.returncode != 0, cluster.transcript()
    [error] = _errors(node.output)
    assert "only 1 of 2 ranks joined" in error and "missing: rank 1" in error, error
