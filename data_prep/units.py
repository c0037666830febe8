"""Stage 1, run by Ray workers: one unit of input → one Parquet file of samples + its counts.

Documents are taken in groups of ``docs_per_group`` consecutive documents of the unit. A group is
the pool NSP draws its random segments from, and its random generator is seeded by
``(seed, unit index, group index)`` alone, so a unit's output does not depend on which worker runs it,
on what else that worker ran, or on how many workers there are.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.format import TOKENIZER_FILE, ids_type, shard_schema
from data_prep.options import PrepOptions
from data_prep.samples import Sample, nsp_samples, packed_samples
from data_prep.sources import ReadCounters, Unit, read_documents
from data_prep.text import document_sentences

UNIT_ROW_GROUP = 8192  # rows per row group of a unit file: stage 2 reads only the groups it needs


@dataclass(frozen=True)
class BuildConfig:
    """Everything a worker needs besides the unit (sent to every task; small)."""

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

        tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / TOKENIZER_FILE))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        _TOKENIZERS[tokenizer_dir] = tokenizer
    return _TOKENIZERS[tokenizer_dir]


def unit_file(units_dir: str | Path, index: int) -> Path:
    return Path(units_dir) / f"unit-{index:08d}.parquet"


def _tokenize_group(
    documents: list[str], tokenizer: Any, room: int, config: BuildConfig, counters: ReadCounters
) -> tuple[list[list[list[int]]], dict[str, int]]:
    """Sentences → token ids; sentences longer than a sample's ``room`` are cut into pieces that fit."""
    per_doc = [
        document_sentences(d, max_line_length=config.options.max_line_length, counters=counters)
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
    return pa.Table.from_arrays(columns, schema=schema)


def build_unit(unit: Unit, config: BuildConfig) -> dict[str, Any]:
    """Read, split, tokenise and sample one unit; write its samples to ``units_dir``; return counts."""
    tokenizer = _tokenizer(config.tokenizer_dir)
    opts = config.options
    counters = ReadCounters()
    schema = shard_schema(config.vocab_size, opts.packing)
    room = opts.seq_len - (3 if opts.packing == "nsp" else 2)
    stats = {
        "documents": 0,
        "sentences": 0,
        "tokens": 0,
        "samples": 0,
        "sample_tokens": 0,
        "nsp_random_next": 0,
    }
    path = unit_file(config.units_dir, unit.index)
    writer: pq.ParquetWriter | None = None

    def flush(group_index: int, documents: list[str]) -> None:
        nonlocal writer
        docs, doc_stats = _tokenize_group(documents, tokenizer, room, config, counters)
        for key, value in doc_stats.items():
            stats[key] += value
        if not docs:
            return
        rng = random.Random(f"{opts.seed}/{unit.index}/{group_index}")  # str seeds hash the same everywhere
        if opts.packing == "nsp":
            samples = nsp_samples(
                docs,
                rng,
                seq_len=opts.seq_len,
                cls_id=config.cls_id,
                sep_id=config.sep_id,
                short_seq_prob=opts.short_seq_prob,
                random_next_prob=opts.random_next_prob,
            )
        else:
            samples = packed_samples(
                docs, rng, seq_len=opts.seq_len, cls_id=config.cls_id, sep_id=config.sep_id
            )
        if not samples:
            return
        stats["samples"] += len(samples)
        stats["sample_tokens"] += sum(len(s.input_ids) for s in samples)
        stats["nsp_random_next"] += sum(1 for s in samples if s.next_sentence_label == 1)
        if writer is None:
            writer = pq.ParquetWriter(path, schema, compression="zstd")
        writer.write_table(_to_table(samples, schema, config.vocab_size), row_group_size=UNIT_ROW_GROUP)

    group: list[str] = []
    group_index = 0
    try:
        for document in read_documents(unit, max_line_length=opts.max_line_length, counters=counters):
            group.append(document)
            if len(group) == opts.docs_per_group:
                flush(group_index, group)
                group, group_index = [], group_index + 1
        if group:
            flush(group_index, group)
    except (OSError, pa.ArrowException) as exc:
        if unit.kind == "hf":
            raise  # a network or hub failure must stop the run, not thin the corpus out
        # A local file that is corrupt beyond its footer: skip the whole unit, and say so in the manifest.
        if writer is not None:
            writer.close()
            writer = None
        path.unlink(missing_ok=True)
        return {
            "unit": unit.index,
            "failed": {
                "path": ", ".join(unit.paths),
                "reason": f"unreadable ({unit.kind} unit {unit.start}): {exc}",
            },
            "counters": ReadCounters().as_dict(),
        }
    finally:
        if writer is not None:
            writer.close()
    return {"unit": unit.index, **stats, "counters": counters.as_dict()}
