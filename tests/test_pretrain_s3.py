"""Pre-training from and into object storage without the launcher (one process), against a real local S3 server
(moto); the two-rank case, killed and resumed exactly, is in test_pretrain.py. Unsupported locations are refused
in one line before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load

from sparsebert import SparseBertForPreTraining

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "sparsebert" / "pretrain.py"
COMMON = [
    "--config", "tiny_cpu", "model.max_position_embeddings=64", "train.max_steps=4", "dam.search_steps=2",
    "train.micro_batch_size=4", "train.warmup_steps=1", "eval.every=0", "checkpoint.every=0",
    "data.log_sample_ids=true", "mlflow.enabled=false",
]  # fmt: skip


def _pretrain(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(PRETRAIN), *COMMON, *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "output_dir=hdfs://namenode/runs/x",
            "config key 'output_dir': 'hdfs://namenode/runs/x' has scheme hdfs://",
        ),
        ("output_dir=s3a:/bucket/x", "config key 'output_dir': 's3a:/bucket/x' is not a supported location"),
        ("data.path=http://host/corpus", "config key 'data.path': 'http://host/corpus' has scheme http://"),
        (
            "model.init_from=s3://bucket/runs/x/final",
            "config key 'model.init_from': 's3://bucket/runs/x/final' is in",
        ),
    ],
)
def test_an_unsupported_location_is_one_line_before_anything_is_written(tmp_path, override, says):
    result = _pretrain(override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {says}"), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and not any(tmp_path.iterdir())


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
        if not o["Key"].endswith("/")
    }


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_from_s3_and_exports_final_there(s3_bucket, ray_local, tmp_path):
    """One process, corpus and output_dir on S3: stopped by SIGTERM after step 2 (checkpoint uploaded, lease
    released), resumed by the same command with an empty cache, final/ uploaded; read back through boto3."""
    from data_prep import prepare_corpus

    words = ["ka", "lo", "mi", "nu", "po", "ra", "si", "tu", "ven", "wo"]
    docs = [
        " ".join(f"{words[(d + i) % 10]}{words[(d * i) % 10]}" for i in range(60)) + "." for d in range(40)
    ]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    corpus = f"s3://{s3_bucket}/corpora/c"
    prepare_corpus([tmp_path / "docs.txt"], corpus, vocab_size=200, seq_len=64, shard_size=16, progress=False)
    out = f"s3://{s3_bucket}/runs/one"
    args = (f"data.path={corpus}", f"output_dir={out}")

    stopped = _pretrain(
        *args,
        cwd=tmp_path,
        env={"SPARSEBERT_FAULTS": "sigterm_at_step=2", "SPARSEBERT_CACHE": str(tmp_path / "a")},
    )
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    stored = _objects(s3_bucket, "runs/one/")
    assert stored["checkpoints/latest"] == b"step00000002" and ".lease" not in stored
    assert not any(k.startswith("final/") for k in stored)

    resumed = _pretrain(*args, cwd=tmp_path, env={"SPARSEBERT_CACHE": str(tmp_path / "b")})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from step00000002 at step 2" in resumed.stdout
    assert f"model: {out}/final" in resumed.stdout
    stored = _objects(s3_bucket, "runs/one/")
    records = [json.loads(line) for line in stored["samples.rank0.jsonl"].decode().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    ids = [i for r in records for i in r["ids"]]
    assert len(ids) == len(set(ids)) == 16  # each sample once, across the stop

    final = tmp_path / "final"
    for key, data in stored.items():
        if key.startswith("final/"):
            (final / key.removeprefix("final/")).parent.mkdir(parents=True, exist_ok=True)
            (final / key.removeprefix("final/")).write_bytes(data)
    model = SparseBertForPreTraining.from_pretrained(final)
    rank_mask = load(stored["masks/final.rank0.safetensors"])[
        "mask"
    ]  # the mask the run trained with, uploaded
    assert model.config.attention_pattern["frozen"] and torch.equal(model.current_mask(64), rank_mask)
    assert json.loads(stored["final/pretraining_metrics.json"])["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "docs.txt", "final"]  # nothing named s3:
