"""A two-arm study across two nodes simulated on one machine (``tests/multinode.py``): the study's ``launch``
names a two-node hostfile with ``no_ssh``, and each node runs ``python -m sparsebert.study --node-rank N`` with
its own HOME, cache and TMPDIR, as under Slurm; ``output_dir`` is on the shared filesystem. Each arm trains on
both nodes (world size 2); node 0 alone evaluates and writes the table."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from multinode import SimulatedCluster, free_port

pytestmark = pytest.mark.slow

EMBEDDED = "python-docs-seq64-v2"  # the embedded corpus in a node's cache


def _study(root: Path, hostfile: Path) -> Path:
    spec = {
        "name": "two-nodes",
        "output_dir": str(root / "shared" / "study"),
        "pretrain": {"config": "tiny_cpu", "overrides": {
            "train.max_steps": 6, "train.micro_batch_size": 4, "train.warmup_steps": 1, "eval.every": 0,
            "eval.max_batches": 2, "checkpoint.every": 3, "eval.fill_mask": [], "train.log_every": 2}},
        "arms": {"dense": {"model.attention_pattern": "dense"},
                 "dam_s": {"model.attention_pattern": {"name": "dam_s", "lambda": 1.0e-4}}},
        "launch": {"hostfile": str(hostfile), "no_ssh": True, "master_addr": "127.0.0.1",
                   "master_port": free_port()},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'shared' / 'mlflow.db'}"},
        "eval": {"tasks": ["docs_order"], "lrs": [3.0e-4], "seeds": [1], "epochs": 1, "batch_size": 32,
                 "max_seq_len": 64, "max_train_samples": 32},
    }  # fmt: skip
    path = root / "shared" / "study.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _prepared_corpus(node_cache: Path) -> None:
    """The embedded corpus, prepared once on this machine (by a pre-training of it), in the node's own cache."""
    from sparsebert.storage import cache_root

    source = Path(cache_root()) / EMBEDDED
    if (source / "manifest.json").is_file():
        shutil.copytree(source, node_cache / EMBEDDED)


def test_a_two_arm_study_runs_on_two_nodes_with_a_hostfile(tmp_path):
    with SimulatedCluster(tmp_path / "cluster", nodes=2) as cluster:
        path = _study(tmp_path, cluster.hostfile)
        procs = []
        for node in cluster.nodes:
            _prepared_corpus(node.cache)
            with open(node.log, "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "sparsebert.study", str(path), "--no-ray", "--node-rank", str(node.rank)],
                    cwd=node.work, env=node.env(cluster.base_env), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True))  # fmt: skip
        codes = [proc.wait(timeout=1200) for proc in procs]
        logs = [node.output for node in cluster.nodes]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    out = tmp_path / "shared" / "study"
    for arm in ("dense", "dam_s"):
        assert (out / "arms" / arm / "final" / "config.json").is_file()
        assert "world size 2" in logs[0]
    assert "node 1: every arm is trained; node 0 evaluates and reports" in logs[1]
    table = (out / "results.md").read_text()
    assert "| dense (reference) |" in table and "| dam_s |" in table
    assert "--hostfile" in logs[0] and "--node_rank 1" in logs[1]
