"""Stage 2: the per-unit sample files → shards of exactly ``shard_size`` samples (the last may be short).

The corpus order is units by index, rows in file order. Knowing every unit's sample count, shard k
is rows ``[k * shard_size, (k + 1) * shard_size)`` of that order: a fixed set of row ranges of a few
unit files, so the shards are written in parallel and come out the same whatever the workers.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.format import file_sha256, shard_name
from sparsebert import storage

# The reader's unit of work: a rank holds one decoded row group per lane it reads (64 lanes by default), so
# smaller groups bound its memory (~64 MB at seq 128) and mix the epoch order more finely.
SHARD_ROW_GROUP = 4096


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` = the concatenation of ``pieces``: (unit file, first row, end row), written to
    ``directory`` (relative to the output; ``""`` for the training shards)."""

    index: int
    pieces: tuple[tuple[str, int, int], ...]
    directory: str = ""


def plan_shards(
    unit_files: Sequence[tuple[str, int]], shard_size: int, directory: str = ""
) -> list[ShardSpec]:
    """``unit_files`` lists (path, samples) in corpus order; returns the shards' row ranges."""
    files = [(path, n) for path, n in unit_files if n > 0]
    starts = [0]
    for _, n in files:
        starts.append(starts[-1] + n)
    total = starts[-1]
    specs = []
    for index, lo in enumerate(range(0, total, shard_size)):
        hi = min(lo + shard_size, total)
        pieces = []
        f = bisect.bisect_right(starts, lo) - 1
        while lo < hi:
            path, n = files[f]
            take_hi = min(hi, starts[f] + n)
            pieces.append((path, lo - starts[f], take_hi - starts[f]))
            lo = take_hi
            f += 1
        specs.append(ShardSpec(index, tuple(pieces), directory))
    return specs


def _read_rows(path: str, lo: int, hi: int) -> pa.Table:
    """Rows ``[lo, hi)`` of a unit file (a path, or a URI in an object store), reading only the row groups that
    hold them."""
    location = storage.parse(path, "a unit file")
    if location.remote:
        with location.open_input() as source:
            return _rows(pq.ParquetFile(source), lo, hi)
    return _rows(pq.ParquetFile(path), lo, hi)


def _rows(parquet: pq.ParquetFile, lo: int, hi: int) -> pa.Table:
    groups, first_row, row = [], None, 0
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if row + n > lo and row < hi:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    table = parquet.read_row_groups(groups)
    return table.slice(lo - first_row, hi - lo)


def write_shard(spec: ShardSpec, out_dir: str | Path, schema: pa.Schema) -> dict[str, Any]:
    """Write one shard into ``out_dir`` (a path, or a URI in an object store: written here, then uploaded);
    return its manifest entry (with ``dir``, for the driver to pop, when the shard is not a training one)."""
    try:
        table = pa.concat_tables([_read_rows(path, lo, hi) for path, lo, hi in spec.pieces]).cast(schema)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}: a worker cannot see a file another worker wrote; on a multi-node cluster the output must "
            "be reachable from every node: an s3:// or gs:// URI, or a filesystem mounted on every node (NFS, EFS)"
        ) from exc
    dest = storage.parse(out_dir, "the staging directory")
    name = shard_name(spec.index)
    if dest.remote:
        handle, written = tempfile.mkstemp(prefix="data_prep-", suffix=".parquet")
        os.close(handle)
        path = Path(written)
    else:
        path = Path(dest.path) / spec.directory / name
    try:
        pq.write_table(table, path, compression="zstd", row_group_size=SHARD_ROW_GROUP)
        entry = {
            "file": name,
            "samples": table.num_rows,
            "bytes": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        if dest.remote:
            storage.upload(path, (dest / spec.directory if spec.directory else dest) / name)
    finally:
        if dest.remote:
            path.unlink(missing_ok=True)
    return entry | {"dir": spec.directory} if spec.directory else entry
