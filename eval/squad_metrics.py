"""SQuAD EM/F1, re-implemented from the official evaluation scripts (``evaluate-v1.1.py``, ``evaluate-v2.0.py``,
https://rajpurkar.github.io/SQuAD-explorer/) so the numbers match them exactly, including where they differ:

* both normalise answers alike (lower case, drop punctuation, drop the articles a/an/the, collapse whitespace)
  and take the max over gold answers;
* v1.1 counts a question without a prediction as 0 and scores an empty-vs-empty F1 as 0;
* v2.0 ignores gold answers that normalise to nothing, treats "no gold answer" as the gold answer "", scores
  empty-vs-empty as 1, skips questions without a prediction, and reports HasAns/NoAns splits and, given
  no-answer scores, the best threshold on them.

Scores are percentages (0–100), as the official scripts print them.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1(pred_toks: list[str], gold_toks: list[str]) -> float:
    num_same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def exact_match_v1(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def f1_v1(pred: str, gold: str) -> float:
    return _f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def f1_v2(pred: str, gold: str) -> float:
    pred_toks, gold_toks = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)  # a no-answer scores 1 only against a no-answer
    return _f1(pred_toks, gold_toks)


def squad_v1_scores(gold: dict[str, list[str]], preds: dict[str, str]) -> dict[str, float]:
    """``evaluate-v1.1.py``: ``gold`` maps question id -> gold answers, ``preds`` id -> predicted text."""
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid not in preds:
            continue  # the official script counts it in the total with score 0
        em += max(exact_match_v1(preds[qid], a) for a in answers)
        f1 += max(f1_v1(preds[qid], a) for a in answers)
    total = len(gold)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def _best_threshold(preds, scores, na_probs, has_ans) -> tuple[float, float]:
    """Official ``find_best_thresh``: sweep the no-answer score, predicting "" above it."""
    cur = best = float(sum(1 for q in has_ans if not has_ans[q]))
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            cur += scores[qid]
        else:
            cur += -1 if preds[qid] else 0
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def squad_v2_scores(
    gold: dict[str, list[str]], preds: dict[str, str], na_probs: dict[str, float] | None = None
) -> dict[str, float]:
    """``evaluate-v2.0.py`` with its default threshold: ``preds`` already say "" for no answer.

    ``na_probs`` (any score, higher = more likely unanswerable; we pass the null-score difference) adds
    ``best_exact``/``best_f1`` and their thresholds, as the official script does with ``--na-prob-file``.
    """
    has_ans = {qid: bool(answers) for qid, answers in gold.items()}
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    for qid, answers in gold.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        if qid not in preds:
            continue  # the official script skips it (and prints "Missing prediction")
        exact[qid] = max(float(normalize_answer(a) == normalize_answer(preds[qid])) for a in golds)
        f1[qid] = max(f1_v2(preds[qid], a) for a in golds)
    # The official default (na_prob 0 for all, threshold 1.0) never overrides a prediction, so scores are raw.

    def summary(qids: list[str]) -> tuple[float, float, int]:
        return (
            100.0 * sum(exact[q] for q in qids) / len(qids),
            100.0 * sum(f1[q] for q in qids) / len(qids),
            len(qids),
        )

    out: dict[str, float] = {}
    out["exact"], out["f1"], out["total"] = summary(list(exact))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in exact if has_ans[q] == wanted]
        if qids:
            out[f"{prefix}_exact"], out[f"{prefix}_f1"], out[f"{prefix}_total"] = summary(qids)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, exact, na_probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1, na_probs, has_ans)
    return out
