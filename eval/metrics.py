"""GLUE metrics as the official GLUE scorer computes them, by sklearn and scipy.

Which task reports which metric is its :class:`~eval.tasks.TaskSpec`'s ``metrics``; this module only
computes them. Values are fractions in [0, 1] (or [-1, 1] for correlations), as sklearn/scipy return them;
the table shows them ×100. A degenerate dev set (one class, constant predictions) scores 0, never NaN: MLflow
and the median over seeds need a number.

sklearn and scipy are imported when a metric is first computed: the driver and the command line read the task
registry, which refers to these functions, and should not pay seconds of imports for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1_binary(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1; 0.0 when there is no true or predicted positive."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels), np.asarray(preds), zero_division=0))


def matthews_corr(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation; 0.0 when undefined (one class only)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = np.asarray(preds), np.asarray(labels)
    if np.unique(np.concatenate([p, y])).size < 2:
        return 0.0  # sklearn says 0.0 here too, after warning that its confusion matrix has one class
    return float(matthews_corrcoef(y, p))


def _constant(*arrays: np.ndarray) -> bool:
    return any(np.ptp(a) == 0 for a in arrays)


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation; 0.0 for a constant prediction (a barely trained model), where scipy gives NaN."""
    from scipy.stats import pearsonr

    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return 0.0 if _constant(p, y) else float(pearsonr(p, y)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman correlation; 0.0 for a constant prediction, like :func:`pearson`."""
    from scipy.stats import spearmanr

    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return 0.0 if _constant(p, y) else float(spearmanr(p, y)[0])
