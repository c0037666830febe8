"""GLUE examples from the GLUE distribution's TSV files or from the hub (``nyu-mll/glue``).

Local layout (as ``download_glue_data.py`` leaves it): ``GLUE_DIR/<Task>/{train,dev}.tsv``, MNLI with
``dev_matched.tsv``/``dev_mismatched.tsv``. Files are read like the GLUE reference loaders: tab-separated,
no quoting (texts contain bare quotes), CoLA without a header. Anything that does not fit is a
:class:`DataFormatError` naming the file, line and column.
"""

from __future__ import annotations

import csv
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from eval.tasks import TaskSpec

# Some QQP/MNLI fields are long; the csv module's default cap (128 KiB) is not the format's limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataFormatError(ValueError):
    """A data file that does not follow its official format; ``line``/``column`` are 1-based."""

    def __init__(self, path: str | Path, line: int, column: int, message: str):
        self.path, self.line, self.column, self.message = str(path), line, column, message
        super().__init__(f"{path}: line {line}, column {column}: {message}")

    def __reduce__(self):
        # Ray ships a job's exception back to the driver by pickling it: rebuild from all four fields.
        return type(self), (self.path, self.line, self.column, self.message)


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None
    label: int | float  # class id in the hub's order, or the STS-B score


def _label_value(task: TaskSpec, raw: str, where: tuple[Path, int, int]) -> int | float:
    if task.labels is None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 5.0:  # also rejects NaN
            raise DataFormatError(*where, f"score {raw!r} is not a number in [0, 5]")
        return value
    if raw not in task.labels:
        raise DataFormatError(*where, f"label {raw!r} is not one of {', '.join(task.labels)}")
    return task.labels.index(raw)


def read_glue_tsv(task: TaskSpec, path: str | Path, limit: int | None = None) -> list[GlueExample]:
    """Parse one GLUE TSV file of ``task`` (train or dev; test files carry no labels and are not read); with
    ``limit``, only its first ``limit`` examples (a quick check of a file's format)."""
    path = Path(path)
    layout = task.tsv
    assert layout is not None, f"{task.name} is not a GLUE task"
    if not path.is_file():
        raise FileNotFoundError(f"{task.name}: {path} not found (expected the GLUE distribution's layout)")
    # utf-8-sig: MRPC's files carry the BOM of Microsoft's original release in front of "Quality".
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader if limit is None else itertools.islice(reader, limit + 1))
    # A trailing blank line is common (editors); blank lines elsewhere are an error below.
    while rows and rows[-1] == []:
        rows.pop()
    if layout.header:
        if not rows:
            raise DataFormatError(path, 1, 1, "empty file (expected a header line)")
        header, body, first_line = rows[0], rows[1:], 2
        names = {name: i for i, name in enumerate(header)}
        index: dict[str, int] = {}
        for role in ("text_a", "text_b", "label"):
            col = getattr(layout, role)
            if col is None:
                continue
            if col not in names:
                raise DataFormatError(
                    path, 1, len(header) + 1, f"header lacks column {col!r} (found: {', '.join(header)})"
                )
            index[role] = names[col]
        width = len(header)
    else:
        body, first_line = rows, 1
        index = {role: getattr(layout, role) for role in ("text_a", "text_b", "label")}
        index = {k: v for k, v in index.items() if v is not None}
        width = layout.num_columns or max(index.values()) + 1
    examples = []
    for offset, row in enumerate(body):
        line = first_line + offset
        if len(row) != width:
            column = min(len(row), width) + 1
            raise DataFormatError(
                path, line, column, f"expected {width} tab-separated columns, found {len(row)}"
            )

        def where(role: str, line: int = line) -> tuple[Path, int, int]:
            return (path, line, index[role] + 1)

        label = _label_value(task, row[index["label"]], where("label"))
        text_b = row[index["text_b"]] if "text_b" in index else None
        examples.append(GlueExample(row[index["text_a"]], text_b, label))
    if not examples:
        raise DataFormatError(path, first_line, 1, "no examples in file")
    return examples


def examples_from_hub_rows(task: TaskSpec, rows) -> list[GlueExample]:
    """Convert rows of a ``nyu-mll/glue`` split (any iterable of dicts) to examples; unlabeled rows are skipped."""
    a, b = (*task.hub_text_fields, None)[:2]
    out = []
    for row in rows:
        label = row["label"]
        if task.labels is not None and label < 0:  # the hub's test splits carry -1
            continue
        out.append(
            GlueExample(row[a], row[b] if b else None, float(label) if task.labels is None else int(label))
        )
    return out


def load_glue(
    task: TaskSpec,
    split: str,
    glue_dir: str | Path | None = None,
    hub: bool = False,
    max_samples: int | None = None,
) -> list[GlueExample]:
    """Examples of ``split`` ("train" or a key of ``task.dev_splits``) from ``glue_dir`` or, if ``hub``, the hub."""
    tsv_name, hub_split = task.train_split if split == "train" else task.dev_splits[split]
    if hub:
        import datasets  # only when the user asked for the hub: it is slow to import

        rows = datasets.load_dataset(task.hub_path, task.hub_config, split=hub_split)
        examples = examples_from_hub_rows(task, rows)
    elif glue_dir is not None:
        examples = read_glue_tsv(task, Path(glue_dir) / task.dir_name / tsv_name)
    else:
        raise ValueError(f"{task.name}: give a GLUE directory or ask for the hub")
    return examples[:max_samples] if max_samples else examples
