"""Metrics against sklearn/scipy and the official SQuAD scorers' behaviour on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from eval.metrics import accuracy, f1_binary, matthews_corr, pearson, spearman
from eval.squad_metrics import f1_v1, normalize_answer, squad_v1_scores, squad_v2_scores
from eval.tasks import TASKS


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    assert accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))
    assert matthews_corr(preds, labels) == pytest.approx(skm.matthews_corrcoef(labels, preds))
    a, b = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert accuracy(a, b) == pytest.approx(skm.accuracy_score(b, a))  # MNLI: three classes


def test_degenerate_predictions_match_sklearn():
    labels, const = np.array([0, 1, 1, 0]), np.zeros(4, dtype=int)
    assert matthews_corr(const, labels) == skm.matthews_corrcoef(labels, const) == 0.0
    assert f1_binary(const, labels) == skm.f1_score(labels, const, zero_division=0) == 0.0
    assert matthews_corr([1, 1], [1, 1]) == 0.0  # one class in both: undefined, and no NaN
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, 100)
    p = y + rng.normal(0, 1, 100)
    out = TASKS["stsb"].compute_metrics(p, y)
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])


def test_glue_metrics_per_task():
    p, y = [1, 0, 1, 1], [1, 0, 0, 1]
    assert set(TASKS["cola"].compute_metrics(p, y)) == {"matthews_corr"}
    assert TASKS["mrpc"].compute_metrics(p, y) == pytest.approx({"f1": 0.8, "accuracy": 0.75})
    assert set(TASKS["qqp"].compute_metrics(p, y)) == {"f1", "accuracy"}
    assert TASKS["mnli"].compute_metrics([0, 1, 2], [0, 1, 1], suffix="mm") == pytest.approx(
        {"accuracy_mm": 2 / 3}
    )
    assert set(TASKS["stsb"].compute_metrics([0.1, 2.0, 4.0], [0.0, 2.5, 5.0])) == {"pearson", "spearman"}
    assert TASKS["rte"].compute_metrics(p, y) == {"accuracy": 0.75}


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Denver Broncos", "denver broncos"),  # article and case
        ("an apple a day", "apple day"),  # every article, as whole words only
        ("Theater anthem", "theater anthem"),  # ... not inside words
        ("U.S.A.!", "usa"),  # punctuation disappears (no space left behind)
        ("  Santa \t Clara\n", "santa clara"),  # whitespace collapses
        ("the", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_squad_v1_em_f1_hand_computed():
    gold = {
        "a": ["Denver Broncos"],
        "b": ["Santa Clara, California", "Santa Clara"],  # several gold answers: max over them
        "c": ["cat"],
        "d": ["fifty"],  # no prediction: counts as 0 in the total
    }
    preds = {"a": "the Denver Broncos!", "b": "santa clara", "c": "the cat cat"}
    out = squad_v1_scores(gold, preds)
    assert out["exact_match"] == pytest.approx(100 * 2 / 4)
    # a: 1, b: 1, c: P=1/2 R=1 -> 2/3, d: 0
    assert out["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 4)
    assert f1_v1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    assert f1_v1("", "") == 0  # v1.1 gives 0 to empty-vs-empty


def test_squad_v2_no_answer_handling():
    gold = {
        "has1": ["Denver Broncos"],
        "has2": ["Santa Clara"],
        "no1": [],  # unanswerable: the only correct answer is ""
        "no2": [],
        "weird": ["the"],  # normalises to nothing -> treated as gold "" (but counted as HasAns)
        "missing": ["x"],  # no prediction: skipped by the v2.0 script
    }
    preds = {"has1": "Denver Broncos", "has2": "Santa", "no1": "", "no2": "Santa Clara", "weird": ""}
    out = squad_v2_scores(gold, preds)
    assert out["total"] == 5
    assert out["exact"] == pytest.approx(100 * 3 / 5)  # has1, no1, weird
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 1) / 5)  # has2: P=1 R=1/2
    assert out["HasAns_total"] == 3 and out["HasAns_exact"] == pytest.approx(100 * 2 / 3)
    assert out["NoAns_total"] == 2 and out["NoAns_exact"] == pytest.approx(50.0)
    assert "best_exact" not in out


def test_squad_v2_best_threshold_hand_computed():
    gold = {"a": ["x"], "b": [], "c": []}
    preds = {"a": "x", "b": "y", "c": ""}
    na = {"a": 0.1, "b": 0.9, "c": 0.5}
    out = squad_v2_scores(gold, preds, na)
    # Predicting "" above 0.1 makes b right too: 3/3. (Sweep: start 2 no-answers right; a +1 -> 3; c +0; b -1.)
    assert out["best_exact"] == pytest.approx(100.0) and out["best_exact_thresh"] == pytest.approx(0.1)
    assert out["best_f1"] == pytest.approx(100.0) and out["best_f1_thresh"] == pytest.approx(0.1)
    assert out["exact"] == pytest.approx(100 * 2 / 3)
