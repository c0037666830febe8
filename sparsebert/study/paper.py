"""The paper's published rows (``paper_results.yaml``), and which arm of a study each one stands beside: an arm
whose mask is the row's pattern with the paper's parameters (DAM: the same λ), with its diagonal."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).parent / "paper_results.yaml"


@dataclass(frozen=True)
class PaperRow:
    label: str
    pattern: dict[str, Any]
    sparsity: float  # percent
    values: dict[str, float]  # by results.csv column, percent
    avg: float


@functools.cache
def paper_rows() -> tuple[PaperRow, ...]:
    data = yaml.safe_load(DATA.read_text())
    return tuple(
        PaperRow(row["label"], row["pattern"], row["sparsity"], dict(zip(data["columns"], row["scores"], strict=True)), row["avg"])
        for row in data["rows"]
    )  # fmt: skip


def paper_row(pattern: str | dict) -> PaperRow | None:
    """The paper's row of a mask spec (``model.attention_pattern``), if the paper has one."""
    from sparsebert.model.masks import parse_spec

    spec = parse_spec(pattern)
    if spec.params.get("no_diagonal"):
        return None
    for row in paper_rows():
        if row.pattern["name"] != spec.name:
            continue
        if spec.learned:
            if math.isclose(spec.params["lambda"], row.pattern["lambda"], rel_tol=1e-6):
                return row
        elif spec.params == parse_spec(row.pattern).params:  # the paper's parameters: the defaults
            return row
    return None
