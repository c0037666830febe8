"""Stage 1, run by Ray workers: one unit of input → one Parquet file of samples per split + its counts.

Documents are taken in groups of ``docs_per_group`` consecutive documents of the unit. A group is
the pool NSP draws its random segments from, and its random generator is seeded by
``(seed, unit index, group index)`` alone, so a unit's output does not depend on which worker runs it,
on what else that worker ran, or on how many workers there are.

With a validation split, each document goes whole to one split: all of a validation input's unit, or,
with ``validation_fraction``, those ``held_out`` picks (a hash of the seed and the text, nothing else).
The two splits are grouped apart (a training sample's random next segment never comes from a validation
document), each group seeded by ``(seed, unit, split, group)``; the training groups of a run without a
validation split are exactly those of before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.failures import TransientError, inject_unit_fault, is_transient
from data_prep.format import TOKENIZER_FILE, file_sha256, ids_type, shard_schema
from data_prep.options import PrepOptions
from data_prep.samples import Sample, nsp_samples, packed_samples, padding_free_samples
from data_prep.sources import ReadCounters, Unit, read_documents
from data_prep.text import document_sentences
from sparsebert import storage

UNIT_ROW_GROUP = 8192  # rows per row group of a unit file: stage 2 reads only the groups it needs
SEGMENTS_CAP = 8  # segments-per-sample counts above this are counted together ("8" means 8 or more)


@dataclass(frozen=True)
class BuildConfig:
    """Everything a worker needs besides the unit (sent to every task; small). ``tokenizer_dir`` and
    ``units_dir`` are local paths, or URIs in an object store when the output is one (``data_prep.remote``)."""

    tokenizer_dir: str
    units_dir: str
    cls_id: int
    sep_id: int
    vocab_size: int  # the tokenizer's, which options.vocab_size only asks for when training one
    options: PrepOptions


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(tokenizer_dir: str) -> Any:
    """The worker's tokenizer, loaded once per worker process."""
    if tokenizer_dir not in _TOKENIZERS:
        # One Ray task = one CPU: parallelism comes from Ray, not from the tokenizer's own thread pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        location = storage.parse(tokenizer_dir, "the tokenizer directory")
        tokenizer = Tokenizer.from_str((location / TOKENIZER_FILE).read_text())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _TOKENIZERS[tokenizer_dir] = tokenizer
    return _TOKENIZERS[tokenizer_dir]


HELD_OUT_RULE = (
    "sha256(f'{seed}\\n' + document text, UTF-8): its first 8 bytes as a big-endian integer / 2**64 "
    "< validation_fraction"
)


def held_out(document: str, seed: int, fraction: float) -> bool:
    """Whether ``document`` belongs to the validation split (``HELD_OUT_RULE``): a function of the seed and
    the text alone, so the choice does not depend on the workers, the units or the document's position;
    identical documents land in the same split."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\n".encode() + document.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * (1 << 64)


def unit_name(index: int, split: str = "train") -> str:
    suffix = "" if split == "train" else f".{split}"
    return f"unit-{index:08d}{suffix}.parquet"


def unit_file(units_dir: str | Path, index: int, split: str = "train") -> str:
    """Where unit ``index`` keeps its samples of ``split``: a path, or a URI in an object store."""
    return f"{str(units_dir).rstrip('/')}/{unit_name(index, split)}"


def record_name(index: int) -> str:
    """The record of a finished unit: its counts and the SHA-256 and size of each file it wrote (``--resume``)."""
    return f"unit-{index:08d}.json"


def finished_unit(units_dir: str | Path, index: int) -> dict[str, Any] | None:
    """The counts of unit ``index`` if an earlier attempt finished it and its files are intact, else None.
    Local files are hashed again; in an object store, where an object is only ever there whole and the record
    is written after the files, each file's size is checked against the record."""
    location = storage.parse(units_dir, "the units directory")
    try:
        record = json.loads((location / record_name(index)).read_text())
        if location.remote:
            intact = all((location / n).size() == size for n, size in record["bytes"].items())
        else:
            intact = all(file_sha256(Path(location.path) / n) == h for n, h in record["files"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return record["stats"] if intact else None


def _write_record(local_dir: Path, shared: storage.Location, index: int, stats: dict[str, Any]) -> None:
    """Record unit ``index`` as finished, after its files; in an object store, upload the files first."""
    files, sizes = {}, {}
    for split in ("train", "validation"):
        path = local_dir / unit_name(index, split)
        if path.exists():
            files[path.name], sizes[path.name] = file_sha256(path), path.stat().st_size
            if shared.remote:
                storage.upload(path, shared / path.name)
    record = local_dir / record_name(index)
    text = json.dumps({"stats": stats, "files": files, "bytes": sizes})
    if shared.remote:
        (shared / record.name).write_text(text)
        return
    partial = record.with_name(record.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, record)  # a record exists only whole, and only after its files


def _tokenize_group(
    documents: list[str], tokenizer: Any, room: int, config: BuildConfig, counters: ReadCounters
) -> tuple[list[list[list[int]]], dict[str, int]]:
    """Sentences → token ids; sentences longer than a sample's ``room`` are cut into pieces that fit."""
    per_doc = [
        document_sentences(
            d,
            max_line_length=config.options.max_line_length,
            counters=counters,
            splitter=config.options.sentence_splitter,
        )
        for d in documents
    ]
    flat = [s for sentences in per_doc for s in sentences]
    encodings = tokenizer.encode_batch_fast(flat, add_special_tokens=False) if flat else []
    docs: list[list[list[int]]] = []
    stats = {"documents": 0, "sentences": 0, "tokens": 0}
    cursor = 0
    for sentences in per_doc:
        doc: list[list[int]] = []
        for encoding in encodings[cursor : cursor + len(sentences)]:
            ids = encoding.ids
            doc.extend(ids[i : i + room] for i in range(0, len(ids), room))
            stats["tokens"] += len(ids)
        cursor += len(sentences)
        if doc:
            docs.append(doc)
            stats["documents"] += 1
            stats["sentences"] += len(doc)
        else:
            counters.empty_documents += 1
    return docs, stats


def _to_table(samples: list[Sample], schema: pa.Schema, vocab_size: int) -> pa.Table:
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int32, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(
        chain.from_iterable(s.input_ids for s in samples),
        dtype=np.uint16 if ids_type(vocab_size) == pa.uint16() else np.uint32,
        count=int(offsets[-1]),
    )
    columns = [
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        pa.array(np.fromiter((s.a_length for s in samples), dtype=np.int16, count=len(samples))),
    ]
    if "next_sentence_label" in schema.names:
        columns.append(
            pa.array(np.fromiter((s.next_sentence_label for s in samples), dtype=np.int8, count=len(samples)))
        )
    if "document_starts" in schema.names:
        columns.append(pa.array([list(s.document_starts) for s in samples], type=pa.list_(pa.int16())))
    return pa.Table.from_arrays(columns, schema=schema)


class _Split:
    """One split's share of a unit: its groups, counts and unit file (opened on the first sample)."""

    def __init__(
        self, name: str, unit: Unit, config: BuildConfig, schema: pa.Schema, local_dir: Path
    ) -> None:
        self.name, self.unit, self.config, self.schema = name, unit, config, schema
        self.path = local_dir / unit_name(unit.index, name)
        self.writer: pq.ParquetWriter | None = None
        self.group: list[str] = []
        self.group_index = 0
        self.stats = dict.fromkeys(
            ("documents", "sentences", "tokens", "samples", "sample_tokens", "nsp_random_next"), 0
        )
        self.segments: dict[str, int] = {}  # NSP samples by the sentences of the chunk they came from

    def add(self, document: str, tokenizer: Any, counters: ReadCounters) -> None:
        self.group.append(document)
        if len(self.group) == self.config.options.docs_per_group:
            self.flush(tokenizer, counters)

    def flush(self, tokenizer: Any, counters: ReadCounters) -> None:
        if not self.group:
            return
        documents, group_index = self.group, self.group_index
        self.group, self.group_index = [], group_index + 1
        opts = self.config.options
        room = opts.seq_len - (3 if opts.packing == "nsp" else 2)
        docs, doc_stats = _tokenize_group(documents, tokenizer, room, self.config, counters)
        for key, value in doc_stats.items():
            self.stats[key] += value
        if not docs:
            return
        # str seeds hash the same everywhere; the training split's are those of a run without validation
        tag = "" if self.name == "train" else f"{self.name}/"
        rng = random.Random(f"{opts.seed}/{self.unit.index}/{tag}{group_index}")
        if opts.packing == "nsp":
            samples = nsp_samples(
                docs,
                rng,
                seq_len=opts.seq_len,
                cls_id=self.config.cls_id,
                sep_id=self.config.sep_id,
                short_seq_prob=opts.short_seq_prob,
                random_next_prob=opts.random_next_prob,
            )
        else:
            pack = padding_free_samples if opts.packing == "padding_free" else packed_samples
            samples = pack(
                docs, rng, seq_len=opts.seq_len, cls_id=self.config.cls_id, sep_id=self.config.sep_id
            )
        if not samples:
            return
        self.stats["samples"] += len(samples)
        self.stats["sample_tokens"] += sum(len(s.input_ids) for s in samples)
        self.stats["nsp_random_next"] += sum(1 for s in samples if s.next_sentence_label == 1)
        if opts.packing == "nsp":
            for sample in samples:
                bucket = str(min(sample.segments, SEGMENTS_CAP))
                self.segments[bucket] = self.segments.get(bucket, 0) + 1
        if self.writer is None:
            # Uncompressed: a unit file is read once, by stage 2, which compresses the shards.
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="none")
        self.writer.write_table(
            _to_table(samples, self.schema, self.config.vocab_size), row_group_size=UNIT_ROW_GROUP
        )

    def close(self, *, discard: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if discard:
            self.path.unlink(missing_ok=True)


def build_unit(unit: Unit, config: BuildConfig) -> dict[str, Any]:
    """Read, split, tokenise and sample one unit; write its samples to ``units_dir`` (one file per split);
    return counts: the training split's at the top, the validation split's under ``validation`` (only when
    the run has a validation split)."""
    inject_unit_fault(unit.index, config.units_dir)
    shared = storage.parse(config.units_dir, "the units directory")
    # In an object store the files are written on this machine first, then uploaded (with the record last).
    local_dir = Path(tempfile.mkdtemp(prefix="data_prep-unit-")) if shared.remote else Path(shared.path)
    try:
        return _build_unit(unit, config, local_dir, shared)
    finally:
        if shared.remote:
            shutil.rmtree(local_dir, ignore_errors=True)


def _build_unit(unit: Unit, config: BuildConfig, local_dir: Path, shared: storage.Location) -> dict[str, Any]:
    tokenizer = _tokenizer(config.tokenizer_dir)
    opts = config.options
    counters = ReadCounters()
    schema = shard_schema(config.vocab_size, opts.packing)
    train = _Split("train", unit, config, schema, local_dir)
    validation = _Split("validation", unit, config, schema, local_dir)
    fraction = opts.validation_fraction
    try:
        for document in read_documents(unit, max_line_length=opts.max_line_length, counters=counters):
            if unit.split == "validation" or held_out(document, opts.seed, fraction):
                validation.add(document, tokenizer, counters)
            else:
                train.add(document, tokenizer, counters)
        train.flush(tokenizer, counters)
        validation.flush(tokenizer, counters)
    except Exception as exc:
        train.close(discard=True)
        validation.close(discard=True)
        if is_transient(exc):  # Ray runs the task again (``failures.RETRIES``)
            raise TransientError(f"unit {unit.index} ({_where(unit)}): {type(exc).__name__}: {exc}") from exc
        if unit.kind == "hf" or not isinstance(exc, (OSError, pa.ArrowException)):
            # a hub failure must stop the run, not thin the corpus out
            raise ValueError(f"unit {unit.index} ({_where(unit)}): {type(exc).__name__}: {exc}") from exc
        # A local file that is corrupt beyond its footer: skip the whole unit, and say so in the manifest.
        result = {
            "unit": unit.index,
            "failed": {
                "path": ", ".join(unit.paths),
                "reason": f"unreadable ({unit.kind} unit {unit.start}): {exc}",
            },
            "counters": ReadCounters().as_dict(),
        }
        _write_record(local_dir, shared, unit.index, result)
        return result
    finally:
        train.close()
        validation.close()
    result = {"unit": unit.index, **train.stats, "counters": counters.as_dict()}
    if opts.packing == "nsp":
        result["segments_per_sample"] = train.segments
    if opts.has_validation:
        result["validation"] = validation.stats
    _write_record(local_dir, shared, unit.index, result)
    return result


def _where(unit: Unit) -> str:
    if unit.kind == "hf":
        return "a Hugging Face dataset shard"
    return f"{unit.kind} {', '.join(unit.paths)} at {unit.start}"
