"""Shared fixtures: a real local Ray, a real MLflow store, a real local S3 server (moto), a process group of one
and a prepared tiny corpus, all offline. Shared plain helpers (paths, a free port, synthetic text): ``helpers.py``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import free_port, syllable_documents

# Tests never touch the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Object storage: the local S3 server of ``s3_server`` (started on first use), never a real one. Set before any
# process starts (Ray's workers among them: they keep the environment they started with) and with stand-in
# credentials, so a developer's own never reach a test.
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(S3_ENV)
for _key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_key, None)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite-backed MLflow tracking store, also exported to subprocesses."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """FlexAttention run eagerly: the same results, without compiling for 20-30 s per shape on a CPU."""
    monkeypatch.setenv("SPARSEBERT_FLEX_COMPILE", "0")


@pytest.fixture
def process_group(monkeypatch):
    """A real process group of one (gloo), as ``deepspeed`` forms it for a single rank."""
    import torch.distributed as dist

    # Set for this test only: processes later tests start must not inherit a port this one used.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    from sparsebert.train import distributed as deepspeed_setup

    deepspeed_setup.destroy_process_group()


class S3Server:
    """The local S3 server that ``S3_ENV`` points every client at."""

    def use(self, patch: pytest.MonkeyPatch) -> str:
        """Make sure this process and its subprocesses point at the server (a test may have changed the
        variables); create a fresh bucket there through boto3, the reference client, and return its name."""
        import boto3

        for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(key, raising=False)
        for key, value in S3_ENV.items():
            patch.setenv(key, value)
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (``moto_server``: the S3 protocol over HTTP) on the port of ``S3_ENV``, for the
    session (module-scoped fixtures call its ``use`` inside ``pytest.MonkeyPatch.context()``)."""
    port = int(S3_ENV["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.2)
    yield S3Server()
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the local S3 server; ``AWS_ENDPOINT_URL`` and credentials set for this test."""
    return s3_server.use(monkeypatch)


@pytest.fixture(scope="session")
def pretrain_corpus(tmp_path_factory, ray_local) -> Path:
    """A prepared corpus for tiny pre-training runs (``syllable_documents``: seq_len 64, vocabulary 300, shards of
    64 samples, a fifth held out for validation), prepared once for the session through the real pipeline."""
    from data_prep import prepare_corpus

    root = tmp_path_factory.mktemp("pretrain_corpus")
    (root / "docs.txt").write_text(syllable_documents())
    prepare_corpus(
        [root / "docs.txt"], root / "prepared", vocab_size=300, seq_len=64, seed=0, shard_size=64,
        progress=False, validation_fraction=0.2,
    )  # fmt: skip
    return root / "prepared"
