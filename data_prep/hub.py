"""Hugging Face hub datasets as corpus sources, streamed by the workers (network only when named).

The driver lists a dataset's shards (one per Parquet row group after ``reshard``) and pickles each;
a worker unpickles its shard and streams the rows. No shared cache or full download is needed,
and the row order (hence the output) is fixed by the dataset's revision, which the manifest records
as the commit it resolved to (pass ``revision=<that commit>`` to reproduce a corpus exactly).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face dataset: ``NAME [CONFIG] [key=value ...]`` on the command line.

    Keys: ``split`` (default ``train``), ``column`` (default: the global text column), ``revision``
    (a branch, tag or commit, e.g. ``refs/convert/parquet`` for datasets that still ship a loading
    script) and ``rows_per_document`` (for datasets with one sentence per row, like BookCorpus).
    """

    name: str
    config: str | None = None
    split: str = "train"
    column: str | None = None
    revision: str | None = None
    rows_per_document: int | None = None

    @classmethod
    def parse(cls, tokens: Sequence[str] | str) -> HfSource:
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if not tokens:
            raise ValueError("--hf-dataset needs a dataset name")
        name, rest = tokens[0], tokens[1:]
        config = None
        if rest and "=" not in rest[0]:
            config, rest = rest[0], rest[1:]
        options: dict[str, Any] = {}
        allowed = {"split", "column", "revision", "rows_per_document"}
        for token in rest:
            key, sep, value = token.partition("=")
            if not sep or key not in allowed:
                raise ValueError(
                    f"--hf-dataset {name}: expected key=value with key in {sorted(allowed)}, got {token!r}"
                )
            options[key] = int(value) if key == "rows_per_document" else value
        return cls(name=name, config=config, **options)


def hub_shards(source: HfSource, *, column: str) -> tuple[list[bytes], dict[str, Any]]:
    """The pickled shards of ``source`` and its manifest entry; raises if it cannot be used."""
    import datasets  # only when a hub dataset is asked for: it is slow to import

    try:
        ds = datasets.load_dataset(
            source.name, source.config, split=source.split, streaming=True, revision=source.revision
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot use this dataset"
        raise ValueError(
            f"cannot load Hugging Face dataset {source.name!r} ({source.config}): {exc}"
        ) from exc
    if ds.features is not None and column not in ds.features:
        raise ValueError(
            f"Hugging Face dataset {source.name!r} has no column {column!r} (has {list(ds.features)})"
        )
    if hasattr(ds, "reshard"):
        ds = ds.reshard()  # one shard per Parquet row group instead of per file: more parallelism
    n = ds.num_shards
    shards = [pickle.dumps(ds.shard(num_shards=n, index=i)) for i in range(n)]
    entry = {"type": "huggingface", **asdict(source), "column": column, "units": n}
    return shards, entry | {"commit": _commit(source)}


def _commit(source: HfSource) -> str | None:
    """The hub commit ``source.revision`` (default: main) points at now; None for local datasets."""
    if Path(source.name).exists():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(source.name, revision=source.revision).sha
    except Exception:  # offline or no access: the manifest then lacks the commit, the data is still read
        return None


def hub_rows(shard: bytes, column: str) -> Iterator[Any]:
    """The ``column`` values of one pickled shard, in order."""
    for row in pickle.loads(shard):
        yield row.get(column)
