"""Where documents come from: input resolution, the work units, and reading documents from a unit.

The corpus is cut into *units*, fixed by the input alone (file sizes, Parquet row groups, Hugging Face
shards) and never by the number of workers. A unit is the grain of parallel work and, together with
the seed, fixes every random choice made on its documents; that is what makes the output identical
whatever the number of workers.

Bad input is counted, never silently dropped: ``ReadCounters`` travels with every unit and ends up in
the manifest. Files that cannot be read at all are listed with the reason.
"""

from __future__ import annotations

import glob
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.hub import HfSource, hub_rows, hub_shards

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")


@dataclass
class ReadCounters:
    """Input problems met while reading; summed over units into the manifest."""

    invalid_utf8_lines: int = 0  # repaired: undecodable bytes replaced by U+FFFD, line kept
    long_lines: int = 0  # skipped: longer than max_line_length
    bad_json_lines: int = 0  # skipped: JSONL line that is not a JSON object
    missing_text: int = 0  # skipped: record without a string in the text column
    empty_documents: int = 0  # skipped: no token left after cleaning

    def add(self, other: ReadCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """One piece of parallel work: a byte range of a text/JSONL file, a Parquet row group, a batch of
    one-document-per-file texts, or one shard of a Hugging Face dataset."""

    index: int
    kind: str  # "text" | "text_files" | "jsonl" | "parquet" | "hf"
    paths: tuple[str, ...] = ()
    start: int = 0  # byte offset (text, jsonl) or row group (parquet)
    stop: int = 0  # byte offset, exclusive (text, jsonl)
    column: str = "text"
    rows_per_document: int = 1
    hf_shard: bytes = b""  # the pickled, already sharded IterableDataset
    split: str = "train"  # "validation": a unit of a validation input, every document held out


@dataclass
class Plan:
    """The units of a corpus, what they came from, and the files that were skipped whole."""

    units: list[Unit] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    skipped_files: list[dict[str, str]] = field(default_factory=list)


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


def resolve_files(inputs: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list.

    A named path that does not exist, a glob that matches nothing, or a named file of an unknown type
    is an error; unknown files found inside a directory are skipped and reported.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_file():
            if _kind_of(path) is None:
                raise ValueError(f"{path}: unsupported input type; expected .txt, .jsonl or .parquet")
            files.append(path)
            continue
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file())
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            if not matches:
                raise FileNotFoundError(f"input glob matches nothing: {raw}")
            candidates = []
            for match in matches:
                candidates.extend(
                    sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match]
                )
        else:
            raise FileNotFoundError(f"input not found: {raw}")
        for candidate in candidates:
            if _kind_of(candidate) is None:
                skipped.append({"path": str(candidate), "reason": "unsupported file type"})
            else:
                files.append(candidate)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, skipped


def read_line(f: BinaryIO, limit: int) -> tuple[bytes | None, bool]:
    """The next line of ``f``; ``(None, False)`` at the end, ``(b"", True)`` for a line over ``limit``
    bytes, which is consumed without ever being held in memory whole."""
    line = f.readline(limit + 1)
    if not line:
        return None, False
    if len(line) > limit and not line.endswith(b"\n"):
        while True:
            chunk = f.readline(1 << 20)
            if not chunk or chunk.endswith(b"\n"):
                return b"", True
    return line, False


def _decode(line: bytes, counters: ReadCounters) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        counters.invalid_utf8_lines += 1
        return line.decode("utf-8", errors="replace")


def _next_document_start(f: BinaryIO, offset: int, size: int, limit: int, blank_line: bool) -> int:
    """First offset >= ``offset`` where a document starts: a line start (JSONL) or a line start right
    after a blank line (blank-line separated text)."""
    f.seek(offset - 1)
    read_line(f, limit)  # the rest of the line holding offset - 1 (the Hadoop text-split rule)
    if not blank_line:
        return f.tell()
    while True:
        line, too_long = read_line(f, limit)
        if line is None:
            return size
        if not too_long and not line.strip():
            return f.tell()


def _split_file(path: Path, kind: str, unit_bytes: int, limit: int) -> list[tuple[int, int]]:
    """Byte ranges of roughly ``unit_bytes`` that start at document boundaries."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        target = unit_bytes
        while target < size:
            start = _next_document_start(f, target, size, limit, blank_line=kind == "text")
            if start >= size:
                break
            bounds.append(start)
            target = start + unit_bytes
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def plan_units(
    inputs: Sequence[str | Path],
    hf_sources: Sequence[HfSource] = (),
    *,
    text_column: str = "text",
    doc_per_file: bool = False,
    rows_per_document: int = 1,
    unit_bytes: int = 8 << 20,
    max_line_length: int = 4_000_000,
) -> Plan:
    """Cut the inputs into units (cheap: sizes, a few reads near the cut points, Parquet footers)."""
    plan = Plan()
    files, plan.skipped_files = resolve_files(inputs)
    reading = {"column": text_column, "rows_per_document": rows_per_document}
    batch: list[str] = []  # one-document-per-file texts, gathered into units of about unit_bytes
    batch_bytes = 0
    for path in files:
        kind, size = _kind_of(path), path.stat().st_size
        if size == 0:
            plan.skipped_files.append({"path": str(path), "reason": "empty file"})
            continue
        if kind == "text" and doc_per_file:
            batch.append(str(path))
            batch_bytes += size
            if batch_bytes >= unit_bytes:
                _add(plan, "text_files", paths=tuple(batch))
                batch, batch_bytes = [], 0
        elif kind in ("text", "jsonl"):
            for start, stop in _split_file(path, kind, unit_bytes, max_line_length):
                _add(plan, kind, paths=(str(path),), start=start, stop=stop, **reading)
        elif not _add_parquet(plan, path, reading):
            continue
        plan.sources.append({"type": kind, "path": str(path), "bytes": size})
    if batch:
        _add(plan, "text_files", paths=tuple(batch))
    for source in hf_sources:
        shards, entry = hub_shards(source, column=source.column or text_column)
        rows = source.rows_per_document or rows_per_document
        for shard in shards:
            _add(plan, "hf", column=entry["column"], rows_per_document=rows, hf_shard=shard)
        plan.sources.append(entry)
    return plan


def _add(plan: Plan, kind: str, **fields: Any) -> None:
    plan.units.append(Unit(index=len(plan.units), kind=kind, **fields))


def _add_parquet(plan: Plan, path: Path, reading: dict[str, Any]) -> bool:
    """A unit per row group of a Parquet file; False (and the file listed as skipped) if it cannot be read or
    has no text column."""
    column = reading["column"]
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        plan.skipped_files.append({"path": str(path), "reason": f"unreadable Parquet file: {exc}"})
        return False
    if schema.get_field_index(column) < 0:
        plan.skipped_files.append(
            {"path": str(path), "reason": f"no column {column!r} (columns: {schema.names})"}
        )
        return False
    kind = schema.field(column).type
    if not pa.types.is_string(kind) and not pa.types.is_large_string(kind):
        plan.skipped_files.append({"path": str(path), "reason": f"column {column!r} is not text"})
        return False
    for row_group in range(metadata.num_row_groups):
        _add(plan, "parquet", paths=(str(path),), start=row_group, **reading)
    return True


def _group_rows(values: Iterable[str], rows_per_document: int) -> Iterator[str]:
    """Join ``rows_per_document`` consecutive rows into one document (one row per line)."""
    if rows_per_document <= 1:
        yield from values
        return
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == rows_per_document:
            yield "\n".join(chunk)
            chunk = []
    if chunk:
        yield "\n".join(chunk)


def _text_lines(path: str, start: int, stop: int, limit: int, counters: ReadCounters) -> Iterator[str]:
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < stop:
            line, too_long = read_line(f, limit)
            if line is None:
                return
            if too_long:
                counters.long_lines += 1
                continue
            yield _decode(line, counters).strip().lstrip("\ufeff")


def _text_documents(unit: Unit, limit: int, counters: ReadCounters) -> Iterator[str]:
    lines: list[str] = []
    for line in _text_lines(unit.paths[0], unit.start, unit.stop, limit, counters):
        if line:
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _jsonl_values(unit: Unit, limit: int, counters: ReadCounters) -> Iterator[str]:
    for line in _text_lines(unit.paths[0], unit.start, unit.stop, limit, counters):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counters.bad_json_lines += 1
            continue
        value = record.get(unit.column) if isinstance(record, dict) else None
        if isinstance(value, str):
            yield value
        elif isinstance(record, dict):
            counters.missing_text += 1
        else:
            counters.bad_json_lines += 1


def _row_values(rows: Iterable[Any], counters: ReadCounters) -> Iterator[str]:
    for value in rows:
        if isinstance(value, str):
            yield value
        else:
            counters.missing_text += 1


def read_documents(unit: Unit, *, max_line_length: int, counters: ReadCounters) -> Iterator[str]:
    """The raw documents of ``unit``, in order (lines separated by ``\\n``)."""
    if unit.kind == "text":
        yield from _text_documents(unit, max_line_length, counters)
    elif unit.kind == "text_files":
        for path in unit.paths:
            lines = [
                ln for ln in _text_lines(path, 0, Path(path).stat().st_size, max_line_length, counters) if ln
            ]
            if lines:
                yield "\n".join(lines)
            else:
                counters.empty_documents += 1
    elif unit.kind == "jsonl":
        yield from _group_rows(_jsonl_values(unit, max_line_length, counters), unit.rows_per_document)
    elif unit.kind == "parquet":
        table = pq.ParquetFile(unit.paths[0]).read_row_group(unit.start, columns=[unit.column])
        values = _row_values(table.column(unit.column).to_pylist(), counters)
        yield from _group_rows(values, unit.rows_per_document)
    elif unit.kind == "hf":
        values = _row_values(hub_rows(unit.hf_shard, unit.column), counters)
        yield from _group_rows(values, unit.rows_per_document)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
