"""``sparsebert.storage`` against a real local S3 server (moto): locations, transfers, publish-last."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from sparsebert import storage
from sparsebert.storage import Location, UnsupportedLocation, parse


@pytest.mark.parametrize(
    ("value", "scheme", "path"),
    [
        ("runs/x", "", "runs/x"),
        ("file:///tmp/x", "", "/tmp/x"),
        ("s3://bucket-a/runs/x/", "s3", "bucket-a/runs/x"),
        ("S3://bucket-a//runs", "s3", "bucket-a/runs"),
        ("gs://bucket-b", "gs", "bucket-b"),
        ("./a:b", "", "a:b"),
    ],
)
def test_supported_locations_parse(value, scheme, path):
    assert parse(value, "--output") == Location(scheme, path)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("hdfs://nn/x", "scheme hdfs://"),
        ("http://host/x", "scheme http://"),
        ("s3a:/x", "not a supported location"),
        ("s3:bucket/x", "not a supported location"),
        ("s3://", "no valid bucket"),
        ("s3://bkt/../x", "'..'"),
        ("file://host/x", "names a host"),
        ("", "is empty"),
    ],
)
def test_unsupported_locations_are_one_line_errors_naming_the_key(value, says):
    with pytest.raises(UnsupportedLocation) as err:
        parse(value, "config key 'output_dir'")
    message = str(err.value)
    assert message.startswith("config key 'output_dir'") and says in message and "\n" not in message


def _keys(bucket: str, prefix: str = "") -> dict[str, bytes]:
    """What the bucket holds, read through boto3 (directory markers left out)."""
    s3 = boto3.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
        if not o["Key"].endswith("/")
    }


def test_objects_read_write_list_and_delete(s3_bucket):
    root = parse(f"s3://{s3_bucket}/dir", "test")
    assert not root.exists() and root.files() == {} and root.children() == []
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(b"\0" * 10)
    assert _keys(s3_bucket) == {"dir/a.txt": b"alpha", "dir/sub/b.bin": b"\0" * 10}
    assert (root / "a.txt").read_text() == "alpha" and (root / "a.txt").is_file()
    assert root.files() == {"a.txt": 5, "sub/b.bin": 10} and root.children() == ["a.txt", "sub"]
    with (root / "sub" / "b.bin").open_input() as f:
        assert f.size() == 10
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/dir/missing"):
        (root / "missing").read_bytes()
    (root / "sub").delete()
    (root / "never").delete()  # nothing there: fine
    assert root.files() == {"a.txt": 5}


def test_a_missing_bucket_is_an_error_naming_the_uri(s3_bucket):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-here/x"):
        (parse("s3://no-such-bucket-here/x", "test") / "f").write_text("x")


def test_upload_download_and_publish_replace(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for name, text in {"manifest.json": "{}", "one.txt": "1", "d/two.txt": "2"}.items():
        (src / name).write_text(text)
    dest = parse(f"s3://{s3_bucket}/corpus", "test")
    (dest / "stale.txt").write_text("from an earlier version")
    storage.publish(src, dest, "manifest.json", replace=True)
    assert _keys(s3_bucket) == {
        "corpus/manifest.json": b"{}",
        "corpus/one.txt": b"1",
        "corpus/d/two.txt": b"2",
    }

    back = tmp_path / "back"
    assert storage.download(dest, back, keep=lambda n: n != "one.txt") == ["d/two.txt", "manifest.json"]
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == [
        "d/two.txt",
        "manifest.json",
    ]


def test_publish_writes_the_marker_only_after_every_part(s3_bucket, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("manifest.json", "a.parquet", "b.parquet"):
        (src / name).write_text(name)
    dest = parse(f"s3://{s3_bucket}/corpus", "test")
    copy = storage._copy_out

    def failing(local, target):
        if local.name == "b.parquet":
            raise storage.StorageError(f"{target}: connection reset")
        copy(local, target)

    monkeypatch.setattr(storage, "_copy_out", failing)
    with pytest.raises(storage.StorageError, match=r"b\.parquet"):
        storage.publish(src, dest, "manifest.json")
    assert "corpus/manifest.json" not in _keys(s3_bucket)  # readers never see an incomplete corpus


def test_local_mirror_is_keyed_by_the_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    assert (
        storage.local_mirror(parse("s3://b-1/runs/x", "t"), "outputs") == tmp_path / "outputs/s3/b-1/runs/x"
    )
    assert storage.local_mirror(parse("runs/x", "t"), "outputs") == Path("runs/x")


def test_a_live_lease_is_refused_naming_its_holder_and_a_dead_one_is_taken(s3_bucket, monkeypatch, tmp_path):
    from sparsebert.train.config import ConfigError
    from sparsebert.train.output_lease import Lease
    from sparsebert.train.run_outputs import RunOutputs

    out = parse(f"s3://{s3_bucket}/runs/x", "test")
    notes = []
    first = Lease(out, ttl=1.5, report=notes.append)
    first.acquire()
    in_use = rf"^s3://{s3_bucket}/runs/x is in use by .*pid \d+ on "
    with pytest.raises(RuntimeError, match=in_use):
        Lease(out, ttl=1.5, report=notes.append).acquire()  # first renews while the second watches
    monkeypatch.setenv("SPARSEBERT_LEASE_SECONDS", "1.5")
    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=in_use) as refused:  # the trainer's: one line, every rank stops
        RunOutputs(out.uri).open()
    assert "\n" not in str(refused.value)
    first._stop.set()  # first dies without a word (killed): its lease stays, no longer renewed
    first._thread.join()
    second = Lease(out, ttl=1.5, report=notes.append)
    second.acquire()  # watched for ttl, unchanged: taken
    assert second.held() and not first.held() and first.lost_to() == second.holder
    second.release()
    assert not (out / ".lease").exists()
    assert any("waiting up to" in note for note in notes)
