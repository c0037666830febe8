"""GLUE metrics as the official GLUE scorer computes them.

CoLA: Matthews correlation; STS-B: Pearson and Spearman correlation; MRPC and QQP: F1 (of the positive class,
label 1) and accuracy; every other task: accuracy; MNLI on both dev sets. Values are fractions in [0, 1] (or
[-1, 1] for correlations), as sklearn/scipy return them; the table shows them ×100.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from eval.tasks import TaskSpec


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean())


def f1_binary(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1; 0.0 when there is no true or predicted positive (sklearn's ``zero_division=0``)."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp = float(np.sum(p & y))
    denom = float(p.sum() + y.sum())
    return 2.0 * tp / denom if denom else 0.0


def matthews_corr(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation for binary labels; 0.0 when undefined (one class only), like sklearn."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson_spearman(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        # A constant prediction (a barely trained model) has no correlation; scipy would warn and give NaN.
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(stats.pearsonr(p, y)[0]), "spearman": float(stats.spearmanr(p, y)[0])}


def glue_metrics(task: TaskSpec, preds: Sequence, labels: Sequence, suffix: str = "") -> dict[str, float]:
    """The official metrics of one GLUE dev set; ``suffix`` ("m"/"mm") names MNLI's two dev sets."""
    if task.name == "cola":
        out = {"matthews_corr": matthews_corr(preds, labels)}
    elif task.name == "stsb":
        out = pearson_spearman(preds, labels)
    elif task.name in ("mrpc", "qqp"):
        out = {"f1": f1_binary(preds, labels), "accuracy": accuracy(preds, labels)}
    else:
        out = {"accuracy": accuracy(preds, labels)}
    return {f"{k}_{suffix}" if suffix else k: v for k, v in out.items()}
