"""The on-disk format of a prepared corpus: one definition shared by the writer and the reader.

A prepared corpus is a directory::

    manifest.json          what was built, from what and how (sources, counts, skips, tokenizer hash, shards)
    tokenizer/             a transformers tokenizer directory (``AutoTokenizer.from_pretrained`` loads it)
    shard-00000.parquet    ``shard_size`` samples each; only the last shard may hold fewer
    shard-00001.parquet
    ...
    validation/            only when asked for (``--validation-fraction``, ``--validation-input``): the
      shard-00000.parquet  held-out split, shards of the same columns, listed in the manifest's
      ...                  ``validation`` section (absent from manifests of corpora without one)

Shard columns (one row per training sample, unpadded; the reader pads to ``seq_len``):

* ``input_ids`` (``list<uint16>``, or ``list<uint32>`` for vocabularies over 65,536 tokens):
  ``[CLS] A [SEP] B [SEP]`` for NSP packing, ``[CLS] sentences... [SEP]`` for full-sentence packing.
* ``a_length`` (``int16``): the number of leading tokens with token type 0 (``len([CLS] A [SEP])``);
  the remaining tokens have token type 1. Full-sentence samples have ``a_length == len(input_ids)``.
* ``next_sentence_label`` (``int8``, NSP packing only): 0 when B follows A in the document, 1 when B
  is a random segment from another document (the convention of transformers' ``BertForPreTraining``).
* ``document_starts`` (``list<int16>``, ``full_sentences`` and ``padding_free`` packing, format 2 on): the
  positions in the sample where another document begins (``[CLS]`` and the first tokens belong to the first
  one; a separator ``[SEP]`` to the document it closes). Empty when the sample holds one document.

Format versions: 2 added ``document_starts`` and ``padding_free`` packing; a version-1 corpus reads as before
(it has no document boundaries, so ``data.document_mask`` refuses it).

A corpus may also live in an object store (``s3://``, ``gs://``): the functions that read one take a local path
or a URI (``sparsebert.storage``, the one module of ``sparsebert`` that ``data_prep`` uses).

This module only needs the standard library, pyarrow and ``sparsebert.storage``, so the training ranks can
import it without pulling in Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sparsebert.storage import Location, download, local_mirror, parse

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
PACKINGS = ("nsp", "full_sentences", "padding_free")
SPLITS = ("train", "validation")
VALIDATION_DIR = "validation"


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.parquet"


def ids_type(vocab_size: int) -> pa.DataType:
    """The narrowest unsigned type that holds every token id (halves shard size for BERT vocabularies)."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int, packing: str, version: int = FORMAT_VERSION) -> pa.Schema:
    """Arrow schema of the shards (and of the intermediate per-unit files) of a corpus of format ``version``."""
    fields = [pa.field("input_ids", pa.list_(ids_type(vocab_size))), pa.field("a_length", pa.int16())]
    if packing == "nsp":
        fields.append(pa.field("next_sentence_label", pa.int8()))
    elif records_documents(packing, version):
        fields.append(pa.field("document_starts", pa.list_(pa.int16())))
    return pa.schema(fields)


def records_documents(packing: str, version: int = FORMAT_VERSION) -> bool:
    """Whether a corpus's samples say where their documents begin (``document_starts``)."""
    return packing != "nsp" and version >= 2


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """SHA-256 of the tokenizer's ``tokenizer.json``, canonicalised so re-saving does not change it.

    The file holds the vocabulary, normaliser, pre-tokeniser and special tokens: everything that
    decides which ids a text becomes.
    """
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable tokenizer.json ({exc})") from exc
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path | Location) -> str:
    """SHA-256 of a file's bytes (a local path, or a file in an object store)."""
    digest = hashlib.sha256()
    remote = isinstance(path, Location) and path.remote
    with path.open_stream() if remote else open(path, "rb") as f:  # type: ignore[union-attr]
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def corpus_location(data_dir: str | Path | Location) -> Location:
    """A corpus directory as a location: a local path or an ``s3://`` / ``gs://`` URI (others are refused)."""
    return data_dir if isinstance(data_dir, Location) else parse(data_dir, "the corpus directory")


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (sorted keys, so equal manifests are equal files)."""
    path = Path(data_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_manifest(data_dir: str | Path | Location) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json`` (of a local directory or an object-store URI); errors name
    the file."""
    location = corpus_location(data_dir)
    if not location.is_dir():
        raise FileNotFoundError(f"prepared corpus directory not found: {location}")
    path = location / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {location} is not a corpus prepared by `python -m data_prep` "
            "(or its preparation did not finish)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        understood = " and ".join(map(str, READABLE_VERSIONS))
        raise ValueError(f"{path}: format_version {found!r}, this reader understands {understood}")
    for key in ("seq_len", "seed", "packing", "tokenizer", "shards", "counts"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    if manifest["packing"] not in PACKINGS:
        raise ValueError(f"{path}: unknown packing {manifest['packing']!r}")
    validation = manifest.get("validation")
    if validation is not None and (
        not isinstance(validation, dict)
        or any(key not in validation for key in ("dir", "shards", "counts"))
        or validation["dir"] != VALIDATION_DIR
    ):
        raise ValueError(
            f"{path}: malformed 'validation' section (needs dir {VALIDATION_DIR!r}, shards, counts)"
        )
    return manifest


def split_section(manifest: dict[str, Any], split: str) -> dict[str, Any] | None:
    """What the manifest says about ``split``: ``dir`` (its shard directory, relative to the corpus; ``""``
    for train), ``shards`` and ``counts``; None when the corpus has no such split (every corpus has
    ``train``; ``validation`` only when it was asked for, so manifests written before it existed read on).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "train":
        return {"dir": "", "shards": manifest["shards"], "counts": manifest["counts"]}
    return manifest.get(split)


def local_tokenizer(data_dir: str | Path | Location, manifest: dict[str, Any]) -> Path:
    """The corpus tokenizer's directory on this machine: in the corpus, or for a corpus in an object store, a
    copy in this node's cache (``$SPARSEBERT_CACHE/corpora/...``), downloaded once per tokenizer. The directory
    is named by the tokenizer's hash and appears whole: concurrent processes each download aside, the first
    rename wins."""
    location = corpus_location(data_dir)
    name = manifest["tokenizer"]["dir"]
    if not location.remote:
        return Path(location.path) / name
    expected = manifest["tokenizer"]["hash"]
    local = local_mirror(location, "corpora") / f"{name}-{expected.split(':')[-1][:16]}"
    if not _holds_tokenizer(local, expected):
        aside = local.with_name(f".{local.name}.{os.getpid()}.part")
        shutil.rmtree(aside, ignore_errors=True)
        download(location / name, aside)
        if local.exists() and not _holds_tokenizer(local, expected):  # a broken copy: replaced
            shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(aside, local)
        except OSError:  # another process of this node renamed its copy first
            shutil.rmtree(aside, ignore_errors=True)
    return local


def _holds_tokenizer(directory: Path, expected_hash: str) -> bool:
    try:
        return tokenizer_hash(directory) == expected_hash
    except (FileNotFoundError, ValueError):
        return False


def check_tokenizer(tokenizer_dir: str | Path, manifest: dict[str, Any], data_dir: str | Path) -> None:
    """Raise unless ``tokenizer_dir`` is the tokenizer the shards were written with."""
    found = tokenizer_hash(tokenizer_dir)
    expected = manifest["tokenizer"]["hash"]
    if found != expected:
        raise ValueError(
            f"{Path(tokenizer_dir) / TOKENIZER_FILE} has hash {found}, but {Path(data_dir) / MANIFEST_NAME} "
            f"was written with tokenizer {expected}: the shards' token ids would mean other words"
        )


def check_shards(
    data_dir: str | Path | Location,
    manifest: dict[str, Any],
    *,
    verify_checksums: bool = False,
    split: str = "train",
    filesystem: pafs.FileSystem | None = None,
) -> list[pq.FileMetaData]:
    """Raise if a shard of ``split`` is missing, truncated, corrupt, of another schema, or not from this
    manifest (or if the corpus has no such split); return the shards' Parquet footers, in manifest order.

    Cheap by default (one listing for the sizes, the Parquet footers); ``verify_checksums`` also hashes every
    byte. ``filesystem`` (a ``pyarrow.fs`` one, e.g. a counting one) serves the footer reads when given.
    """
    location = corpus_location(data_dir)
    manifest_path = location / MANIFEST_NAME
    section = split_section(manifest, split)
    if section is None:
        raise ValueError(f"{manifest_path} has no {split} split")
    shard_dir = location / section["dir"] if section["dir"] else location
    present = {name: size for name, size in shard_dir.files().items() if "/" not in name}
    listed = {shard["file"] for shard in section["shards"]}
    for name in sorted(present):
        if name.endswith(".parquet") and name not in listed:
            raise ValueError(
                f"{shard_dir / name}: Parquet file not listed in {manifest_path}; a foreign file in the shard "
                "directory (remove it, or prepare the corpus again)"
            )
    expected_schema = shard_schema(
        manifest["tokenizer"]["vocab_size"], manifest["packing"], manifest["format_version"]
    )
    footers = []
    for shard in section["shards"]:
        path = shard_dir / shard["file"]
        if shard["file"] not in present:
            raise FileNotFoundError(f"shard listed in {manifest_path} is missing: {path}")
        size = present[shard["file"]]
        if size != shard["bytes"]:
            raise ValueError(
                f"{path}: {size} bytes, {manifest_path} says {shard['bytes']} (truncated or replaced)"
            )
        try:
            with open_shard(path, filesystem) as source:
                metadata = pq.read_metadata(source)
            schema = metadata.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        if metadata.num_rows != shard["samples"]:
            raise ValueError(f"{path}: {metadata.num_rows} rows, {manifest_path} says {shard['samples']}")
        for field in expected_schema:
            if schema.get_field_index(field.name) < 0 or schema.field(field.name).type != field.type:
                raise ValueError(
                    f"{path}: column {field.name!r} missing or not {field.type}; not a shard of this corpus"
                )
        if verify_checksums and file_sha256(path if path.remote else Path(path.path)) != shard["sha256"]:
            raise ValueError(f"{path}: checksum differs from {manifest_path} (corrupt or replaced)")
        footers.append(metadata)
    return footers


def open_shard(path: Location, filesystem: pafs.FileSystem | None = None) -> pa.NativeFile:
    """A random-access reader of a shard: through ``filesystem`` when given, else its location's own."""
    if filesystem is not None:
        return filesystem.open_input_file(path.path if path.remote else os.path.abspath(path.path))
    return path.open_input() if path.remote else pa.OSFile(path.path)
