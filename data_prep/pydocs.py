"""The embedded default corpus: the documentation text that ships with every Python (no network)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def write_python_docs_corpus(path: str | Path) -> Path:
    """Write ``pydoc_data.topics`` (79 topics, ~65k words) as a blank-line separated ``.txt`` corpus.

    One topic is one document; each paragraph of a topic becomes one line (lines are sentence
    boundaries). ``path`` is the file to write, or a directory (one that exists, or any path ending in
    ``/``) to write ``python_docs.txt`` into; missing parent directories are created. Returns the file's
    path.
    """
    from pydoc_data import topics

    as_dir = str(path).endswith(("/", os.sep))
    path = Path(path).expanduser()
    if as_dir or path.is_dir():
        path = path / "python_docs.txt"
    documents = []
    for key in sorted(topics.topics):
        paragraphs = re.split(r"\n\s*\n", topics.topics[key])
        lines = (
            " ".join(part.strip() for part in paragraph.splitlines() if part.strip())
            for paragraph in paragraphs
        )
        documents.append("\n".join(line for line in lines if line))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
