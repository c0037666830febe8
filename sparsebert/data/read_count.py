"""``CountingFileSystem``: files through ``pyarrow.fs``, counting what is actually read from them.

Pass ``counting.filesystem`` to ``ShardReader(filesystem=...)`` to measure the bytes and Parquet row groups
each rank pulls from storage: the counts come from the file reads pyarrow makes, not from the reader. Local
files by default; ``CountingFileSystem(base)`` counts the reads served by another ``pyarrow.fs`` filesystem
(an object store's, with paths ``bucket/key``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.arrow import ArrowFile, ArrowFSWrapper
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


class _CountedFile(LocalFileOpener):
    """A local file whose ``read`` calls add to its file system's counts."""

    def __init__(self, *args: Any, counts: defaultdict, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts = counts

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        offset = self.tell()
        data = super().read(*args, **kwargs)
        self._counts[self.path].append((offset, len(data)))
        return data


class _CountingLocal(LocalFileSystem):
    cachable = False  # fsspec would otherwise hand every caller the same instance (and counts)

    def __init__(self, counts: defaultdict) -> None:
        super().__init__()
        self.counts = counts

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if "r" not in mode:
            raise PermissionError(f"{path}: the counting file system is read-only")
        return _CountedFile(self._strip_protocol(path), mode, fs=self, counts=self.counts, **kwargs)


class _CountedArrowFile(ArrowFile):
    """A file of a ``pyarrow.fs`` filesystem whose ``read`` calls add to the counts."""

    def __init__(self, *args: Any, counts: defaultdict, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts = counts

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        offset = self.stream.tell()
        data = self.stream.read(*args, **kwargs)
        self._counts[self.path].append((offset, len(data)))
        return data


class _CountingArrow(ArrowFSWrapper):
    cachable = False

    def __init__(self, base: pafs.FileSystem, counts: defaultdict) -> None:
        super().__init__(base)
        self.counts = counts

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if "r" not in mode:
            raise PermissionError(f"{path}: the counting file system is read-only")
        return _CountedArrowFile(self, self.fs.open_input_file(path), path, mode, counts=self.counts)


class CountingFileSystem:
    """``filesystem``: a ``pyarrow.fs`` file system over local files (or over ``base``) that records every read
    it serves."""

    def __init__(self, base: pafs.FileSystem | None = None) -> None:
        self.reads: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)  # path -> (offset, bytes)
        self.base = base
        handler = _CountingLocal(self.reads) if base is None else _CountingArrow(base, self.reads)
        self.filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(handler))

    @property
    def total(self) -> int:
        """Bytes read, all files together."""
        return sum(n for reads in self.reads.values() for _, n in reads)

    def reset(self) -> None:
        self.reads.clear()

    def row_groups_read(self, path: str | Path) -> list[int]:
        """The row groups of Parquet file ``path`` at least one of whose column chunks was read whole."""
        if self.base is None:
            spans = _merged(self.reads.get(_CountingLocal._strip_protocol(str(path)), []))
            metadata = pq.read_metadata(path)  # the local file, not through the counting file system
        else:
            spans = _merged(self.reads.get(str(path), []))
            with self.base.open_input_file(str(path)) as source:  # not through the counting file system
                metadata = pq.read_metadata(source)
        groups = []
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                start = chunk.dictionary_page_offset or chunk.data_page_offset
                end = start + chunk.total_compressed_size
                if any(lo <= start and end <= hi for lo, hi in spans):
                    groups.append(g)
                    break
        return groups


def _merged(reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` merged into disjoint ``[lo, hi)`` spans."""
    spans: list[tuple[int, int]] = []
    for lo, hi in sorted((offset, offset + n) for offset, n in reads):
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans
