"""Corpus preparation for BERT pre-training on Ray: text → tokenizer + Parquet shards + manifest.

``python -m data_prep --help`` for the command line (``--help-config`` for every option's value); ``prepare_corpus``
and ``PrepOptions`` (every setting, with its default and help) for Python. The on-disk format lives in ``data_prep.format`` and is
read back by ``sparsebert.data.ShardReader``.

Attributes are imported lazily so the training ranks, which only need ``data_prep.format``, do not
import Ray, datasets and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_prep.hub import HfSource
    from data_prep.options import PrepOptions
    from data_prep.pipeline import prepare_corpus
    from data_prep.pydocs import write_python_docs_corpus

__all__ = ["HfSource", "PrepOptions", "prepare_corpus", "write_python_docs_corpus"]

_LAZY = {
    "prepare_corpus": "data_prep.pipeline",
    "write_python_docs_corpus": "data_prep.pydocs",
    "HfSource": "data_prep.hub",
    "PrepOptions": "data_prep.options",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
