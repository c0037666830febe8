"""Corpora in object storage, against a real local S3 server (moto): ``data_prep --output s3://...`` writes one
(manifest last), ``ShardReader("s3://...")`` streams it, each rank reading only its share."""

from __future__ import annotations

import contextlib
import io
import itertools
import json

import boto3
import pytest
import torch
from helpers import s3_objects, word_documents

from data_prep import cli
from sparsebert import storage
from sparsebert.data import ShardReader
from sparsebert.data.read_count import CountingFileSystem

SEQ_LEN = 48


def _prep(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def _sizes(bucket: str, prefix: str) -> dict[str, int]:
    return {key: len(data) for key, data in s3_objects(bucket, prefix).items()}


@pytest.fixture(scope="module")
def s3_corpus(s3_server, ray_local, tmp_path_factory):
    """A corpus prepared straight into s3://BUCKET/corpora/x by the command line, run from an empty directory;
    yields (bucket, uri, root, the command's stdout). The S3 variables stay set for the module's tests."""
    root = tmp_path_factory.mktemp("s3corpus")
    (root / "c.txt").write_text(word_documents(150, 0))
    (root / "cwd").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        bucket = s3_server.use(patch)
        patch.setenv("SPARSEBERT_CACHE", str(root / "cache"))
        patch.chdir(root / "cwd")
        uri = f"s3://{bucket}/corpora/x"
        code, out, err = _prep(
            "--input", str(root / "c.txt"), "--output", uri, "--vocab-size", "200", "--seq-len", str(SEQ_LEN),
            "--shard-size", "37", "--unit-mb", "0.008192", "--validation-fraction", "0.2", "--quiet",
        )  # fmt: skip
        assert code == 0, err
        yield bucket, uri, root, out


def test_data_prep_uploads_the_corpus_and_says_so_only_then(s3_corpus):
    bucket, uri, root, out = s3_corpus
    objects = _sizes(bucket, "corpora/x/")
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=bucket, Key="corpora/x/manifest.json")["Body"].read()
    )
    shards = {s["file"]: s["bytes"] for s in manifest["shards"]}
    held = {f"validation/{s['file']}": s["bytes"] for s in manifest["validation"]["shards"]}
    assert len(shards) >= 8 and held
    assert {k: v for k, v in objects.items() if k.endswith(".parquet")} == shards | held
    assert "tokenizer/tokenizer.json" in objects and not any(k.startswith("_units") for k in objects)
    assert out.strip().splitlines()[-1].startswith(f"wrote {uri} (")
    assert not any((root / "cwd").iterdir())  # no local folder named "s3:"
    assert not any((root / "cache" / "data_prep").rglob("*.parquet"))  # the local build is gone once uploaded


@pytest.mark.parametrize("output", ["hdfs://namenode/corpora/x", "s3a:/bucket/x", "http://host/x"])
def test_an_unsupported_output_is_a_one_line_error_before_anything_is_written(s3_corpus, output):
    _, _, root, _ = s3_corpus
    code, out, err = _prep("--input", str(root / "c.txt"), "--output", output)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith(f"error: --output: {output!r}")
    assert not any((root / "cwd").iterdir())


def test_a_non_empty_s3_output_is_refused_and_replaced_with_overwrite(s3_corpus):
    bucket, _, root, _ = s3_corpus
    uri = f"s3://{bucket}/corpora/again"
    args = ["--input", str(root / "c.txt"), "--output", uri, "--vocab-size", "200", "--quiet"]
    assert _prep(*args, "--seq-len", "64", "--shard-size", "20")[0] == 0
    many = _sizes(bucket, "corpora/again/")
    code, _, err = _prep(*args, "--seq-len", "32")
    assert code == 2 and f"{uri} is not empty" in err
    assert _sizes(bucket, "corpora/again/") == many  # nothing already written is lost
    assert _prep(*args, "--seq-len", "32", "--overwrite")[0] == 0
    now = _sizes(bucket, "corpora/again/")
    manifest = ShardReader(uri, rank=0, world_size=1, batch_size=1).manifest
    assert manifest["seq_len"] == 32
    assert sorted(k for k in now if k.endswith(".parquet")) == sorted(s["file"] for s in manifest["shards"])
    assert len([k for k in many if k.endswith(".parquet")]) > len(manifest["shards"])  # stale shards removed


def test_readers_stream_their_share_from_s3_and_match_a_local_copy(s3_corpus, tmp_path):
    bucket, uri, root, _ = s3_corpus
    local = tmp_path / "copy"
    storage.download(storage.parse(uri, "test"), local)
    world, lanes, B = 2, 4, 3
    counts = [CountingFileSystem(storage.parse(uri, "test").fs) for _ in range(world)]
    remote = [
        ShardReader(
            uri, rank=r, world_size=world, batch_size=B, seed=5, lanes=lanes, filesystem=counts[r].filesystem
        )
        for r in range(world)
    ]
    here = [
        ShardReader(local, rank=r, world_size=world, batch_size=B, seed=5, lanes=lanes) for r in range(world)
    ]
    tokenizer_copy = remote[0].tokenizer_dir
    assert tokenizer_copy.parent == root / "cache" / "corpora" / "s3" / bucket / "corpora" / "x"
    assert remote[1].tokenizer_dir == tokenizer_copy and remote[0].tokenizer.mask_token == "[MASK]"

    for count in counts:
        count.reset()  # construction read the footers; count what the epoch reads
    steps = remote[0].steps_per_epoch
    for ours, theirs in zip(remote, here, strict=True):
        for a, b in zip(itertools.islice(ours, steps), itertools.islice(theirs, steps), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    footers = {p.path: (p, meta) for p, meta in zip(remote[0]._paths, remote[0]._metadata, strict=True)}
    block_rows = max(
        meta.row_group(j).num_rows for _, meta in footers.values() for j in range(meta.num_row_groups)
    )
    n, mine = remote[0].num_samples, lanes // world
    read = []
    for count in counts:
        groups = [(path, j) for path in footers for j in count.row_groups_read(path)]
        rows = sum(footers[path][1].row_group(j).num_rows for path, j in groups)
        assert rows <= n / world + 2 * mine * block_rows  # its share, plus the blocks its lanes start inside
        read += groups
    assert {path for path, _ in read} == set(footers)  # together the ranks read the whole corpus

    validation = ShardReader.validation(uri, rank=0, world_size=1, batch_size=4)
    assert (
        validation is not None
        and validation.num_samples > 0
        and next(iter(validation))["input_ids"].shape[1] == SEQ_LEN
    )


def test_workers_meet_in_the_bucket_and_keep_nothing_on_their_machine(s3_corpus, tmp_path, monkeypatch):
    """What a Ray worker on any node does for an s3:// output: it loads the tokenizer from the bucket, writes each
    unit's samples and record there and reads them back to write a shard there; its own disk keeps nothing.
    ``--resume`` keeps a unit whose files are whole and redoes one whose file was cut short."""
    import tempfile

    from data_prep.format import shard_schema
    from data_prep.options import PrepOptions
    from data_prep.shards import plan_shards, write_shard
    from data_prep.sources import plan_units
    from data_prep.units import BuildConfig, build_unit, finished_unit, unit_file

    bucket, uri, root, _ = s3_corpus
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tokenizer = ShardReader(uri, rank=0, world_size=1, batch_size=1).manifest["tokenizer"]
    units = f"s3://{bucket}/.staged.partial/_units"
    config = BuildConfig(
        tokenizer_dir=f"{uri}/tokenizer", units_dir=units, cls_id=tokenizer["special_ids"]["cls"],
        sep_id=tokenizer["special_ids"]["sep"], vocab_size=tokenizer["vocab_size"], options=PrepOptions(seq_len=SEQ_LEN),
    )  # fmt: skip
    stats = [build_unit(unit, config) for unit in plan_units([root / "c.txt"], unit_bytes=8192).units[:2]]
    specs = plan_shards([(unit_file(units, s["unit"]), s["samples"]) for s in stats], shard_size=10)
    entry = write_shard(
        specs[0], f"s3://{bucket}/.staged.partial", shard_schema(tokenizer["vocab_size"], "nsp")
    )

    stored = _sizes(bucket, ".staged.partial/")
    assert {f"_units/unit-0000000{i}.{ext}" for i in (0, 1) for ext in ("parquet", "json")} <= set(stored)
    assert stored["shard-00000.parquet"] == entry["bytes"] and entry["samples"] == 10
    assert not any(scratch.iterdir()) and not any((root / "cwd").iterdir())
    assert finished_unit(units, 0) == stats[0]
    boto3.client("s3").put_object(
        Bucket=bucket, Key=".staged.partial/_units/unit-00000000.parquet", Body=b"PAR1"
    )
    assert finished_unit(units, 0) is None and finished_unit(units, 1) == stats[1]
