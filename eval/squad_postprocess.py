"""SQuAD features (question + a window of the context, several windows for long contexts) and the n-best span
post-processing that turns per-window start/end logits back into one answer per question.

``doc_stride`` follows Hugging Face's meaning: the number of context tokens consecutive windows share. A token
seen by several windows is answered from the window where it has the most context on both sides (the
"max context" rule of BERT's ``run_squad.py``). For SQuAD v2.0 the null answer's score is the smallest
``start[CLS] + end[CLS]`` over an example's windows, and "" is predicted when it beats the best span by more
than ``null_threshold``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eval.squad_data import SquadExample


@dataclass
class SquadFeatures:
    """Model inputs (lists, one row per window) plus what post-processing needs to map windows back."""

    inputs: dict[str, list[list[int]]]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]  # None outside the context
    max_context: list[list[bool]]
    start_positions: list[int] | None = None  # training only (0 = the [CLS] token = no answer)
    end_positions: list[int] | None = None


def _encode(tokenizer, examples: Sequence[SquadExample], max_len: int, doc_stride: int, max_query_len: int):
    questions = []
    # Long questions are cut to max_query_len tokens (as BERT does) so the context always gets room.
    q_offsets = tokenizer([ex.question.lstrip() for ex in examples], add_special_tokens=False,
                          return_offsets_mapping=True)["offset_mapping"]  # fmt: skip
    for ex, offs in zip(examples, q_offsets, strict=True):
        q = ex.question.lstrip()
        questions.append(q if len(offs) <= max_query_len else q[: offs[max_query_len - 1][1]])
    return tokenizer(
        questions,
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=max_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",  # fixed length: the sparse mask is defined (and cached) per length
    )


def prepare_features(
    tokenizer,
    examples: Sequence[SquadExample],
    max_len: int,
    doc_stride: int,
    max_query_len: int,
    train: bool,
) -> SquadFeatures:
    enc = _encode(tokenizer, examples, max_len, doc_stride, max_query_len)
    sample_map = enc.pop("overflow_to_sample_mapping")
    raw_offsets = enc.pop("offset_mapping")
    feats = SquadFeatures(inputs=dict(enc), example_index=list(sample_map), offsets=[], max_context=[])
    if train:
        feats.start_positions, feats.end_positions = [], []
    # Max-context scores: a token's score in a window is min(left, right context) + 0.01 * window length.
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for i, offs in enumerate(raw_offsets):
        seq_ids = enc.sequence_ids(i)
        ctx = [p for p, s in enumerate(seq_ids) if s == 1]
        feats.offsets.append([tuple(o) if s == 1 else None for o, s in zip(offs, seq_ids, strict=True)])
        for k, p in enumerate(ctx):
            score = min(k, len(ctx) - 1 - k) + 0.01 * len(ctx)
            key = (sample_map[i], offs[p][0])
            if key not in best or score > best[key][0]:
                best[key] = (score, i)
        if train:
            start, end = _answer_positions(examples[sample_map[i]], offs, ctx)
            feats.start_positions.append(start)
            feats.end_positions.append(end)
    for i, offs in enumerate(feats.offsets):
        ex = sample_map[i]
        feats.max_context.append([o is not None and best[(ex, o[0])][1] == i for o in offs])
    return feats


def _answer_positions(ex: SquadExample, offs, ctx: list[int]) -> tuple[int, int]:
    """Token positions of the (first) gold answer in this window, or (0, 0) if it is not fully inside."""
    if ex.is_impossible or not ex.answers or not ctx:
        return 0, 0
    s_char = ex.answer_starts[0]
    e_char = s_char + len(ex.answers[0])
    if offs[ctx[0]][0] > s_char or offs[ctx[-1]][1] < e_char:
        return 0, 0
    start = next(p for p in ctx if offs[p][1] > s_char)
    end = next(p for p in reversed(ctx) if offs[p][0] < e_char)
    return start, max(start, end)


def postprocess(
    examples: Sequence[SquadExample],
    feats: SquadFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    version_2: bool,
    n_best: int = 20,
    max_answer_len: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Predicted text per question id, and (v2.0) the null-score difference per id (higher = no answer)."""
    by_example: dict[int, list[int]] = defaultdict(list)
    for f, ex in enumerate(feats.example_index):
        by_example[ex].append(f)
    preds: dict[str, str] = {}
    null_diff: dict[str, float] = {}
    for e, ex in enumerate(examples):
        min_null = float("inf")
        candidates: list[tuple[float, int, int]] = []
        for f in by_example.get(e, []):
            s, en, offs, maxc = start_logits[f], end_logits[f], feats.offsets[f], feats.max_context[f]
            min_null = min(min_null, float(s[0] + en[0]))
            top_s = np.argsort(s)[::-1][:n_best]
            top_e = np.argsort(en)[::-1][:n_best]
            for i in top_s:
                if offs[i] is None or not maxc[i]:
                    continue
                for j in top_e:
                    if offs[j] is None or j < i or j - i + 1 > max_answer_len:
                        continue
                    candidates.append((float(s[i] + en[j]), offs[i][0], offs[j][1]))
        candidates.sort(key=lambda c: c[0], reverse=True)
        text = ex.context[candidates[0][1] : candidates[0][2]] if candidates else ""
        if version_2:
            # No span at all counts as a sure "no answer"; 1e9 keeps the score finite for MLflow/JSON.
            diff = min_null - candidates[0][0] if candidates else 1e9
            null_diff[ex.id] = diff
            text = "" if diff > null_threshold else text
        preds[ex.id] = text
    return preds, null_diff
