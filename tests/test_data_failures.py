"""Failures during a preparation: a transient error in one unit is retried by Ray, a killed run resumes
(``--resume``) and both give the output of an uninterrupted run, byte for byte.

The faulty runs are the command line in a fresh process with ``DATA_PREP_FAULTS`` set, so the local Ray it
starts (and its workers) carry the fault; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import synthetic
from data_prep.failures import FAULTS_ENV, TransientError, is_transient
from data_prep.format import MANIFEST_NAME

FLAGS = [
    "--vocab-size",
    "400",
    "--seq-len",
    "64",
    "--shard-size",
    "150",
    "--unit-mb",
    "0.01",
    "--no-progress",
]


def _cli(corpus: Path, out: Path, *extra: str, faults: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, FAULTS_ENV: faults, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "data_prep", "--input", str(corpus), "--output", str(out), *FLAGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _content(out: Path) -> dict[str, bytes]:
    """Every file of a prepared corpus; the manifest without its ``run`` section (time, workers)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop(MANIFEST_NAME))
    manifest.pop("run")
    return files | {MANIFEST_NAME: json.dumps(manifest, sort_keys=True).encode()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    corpus = synthetic.write_corpus(root / "corpus.txt", synthetic.lowercase_corpus(160, seed=5))
    done = _cli(corpus, root / "reference", "--num-workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((root / "reference" / MANIFEST_NAME).read_text())
    assert manifest["counts"]["units"] >= 6  # enough units to fail one and kill the run half-way
    return corpus, root / "reference"


@pytest.mark.slow
def test_a_transient_failure_of_one_unit_is_retried(reference, tmp_path):
    corpus, expected = reference
    done = _cli(corpus, tmp_path / "out", "--num-workers", "2", faults="fail_unit_once=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _content(tmp_path / "out") == _content(expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow
def test_a_killed_run_resumes_with_identical_output(reference, tmp_path):
    corpus, expected = reference
    out = tmp_path / "out"
    killed = _cli(corpus, out, "--num-workers", "1", faults="kill_after_units=3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    staging = tmp_path / ".out.partial"
    assert not out.exists() and len(list((staging / "_units").glob("unit-*.json"))) >= 3

    changed = _cli(corpus, out, "--resume", "--seq-len", "48")
    assert changed.returncode == 2 and "cannot resume" in changed.stderr and "settings" in changed.stderr
    assert staging.is_dir()  # a refused resume leaves the finished units alone

    resumed = _cli(corpus, out, "--resume", "--num-workers", "2")  # not --quiet: its log is read
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished before, their files verified: kept" in resumed.stderr
    assert _content(out) == _content(expected)
    assert not staging.exists()


def test_transient_errors_are_told_from_permanent_ones():
    try:
        raise OSError("disk") from TimeoutError("read timed out")
    except OSError as exc:
        assert is_transient(exc)
    assert is_transient(ConnectionResetError()) and is_transient(TransientError("x"))
    assert not is_transient(ValueError("no column 'text'")) and not is_transient(FileNotFoundError("x"))
