"""SQuAD windows over long contexts (doc stride) and the n-best / max-context / null-answer post-processing."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import BertTokenizerFast

from eval.squad_data import SquadExample
from eval.squad_postprocess import postprocess, prepare_features

WORDS = [f"w{i}" for i in range(80)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "?", *WORDS]) + "\n")
    return BertTokenizerFast(vocab=str(vocab))


def _example(answer_word: int, qid: str = "q", impossible: bool = False) -> SquadExample:
    context = " ".join(WORDS[:60])
    answer = f"w{answer_word} w{answer_word + 1}"
    start = context.index(answer)
    if impossible:
        return SquadExample(qid, "what w1 ?", context, (), (), True)
    return SquadExample(qid, "what w1 ?", context, (answer,), (start,))


def test_long_context_is_split_with_overlap_and_labels_point_at_the_answer(tokenizer):
    ex = _example(30)
    feats = prepare_features(tokenizer, [ex], max_len=32, doc_stride=8, max_query_len=16, train=True)
    n = len(feats.example_index)
    assert n >= 3 and set(feats.example_index) == {0}
    contexts = [[o for o in offs if o is not None] for offs in feats.offsets]
    assert all(
        len(c) == 32 - 3 - 3 for c in contexts[:-1]
    )  # [CLS] q q ? [SEP] ... [SEP]: 3 specials, 3 question
    assert contexts[0][-8:] == contexts[1][:8]  # consecutive windows share doc_stride tokens
    hits = 0
    for i in range(n):
        s, e = feats.start_positions[i], feats.end_positions[i]
        if s == 0:
            assert e == 0  # answer not (fully) in this window -> [CLS]
            continue
        hits += 1
        ids = feats.inputs["input_ids"][i][s : e + 1]
        assert tokenizer.decode(ids) == "w30 w31"
    assert hits >= 1
    # Every context token is "max context" in exactly one window.
    owners = {}
    for i, (offs, maxc) in enumerate(zip(feats.offsets, feats.max_context, strict=True)):
        for o, m in zip(offs, maxc, strict=True):
            if m:
                assert o[0] not in owners
                owners[o[0]] = i
    assert len(owners) == 60


def test_long_questions_are_cut_to_max_query_len(tokenizer):
    ex = SquadExample("q", "what " + " ".join(WORDS[:40]), " ".join(WORDS[:20]), ("w3",), (6,))
    feats = prepare_features(tokenizer, [ex], max_len=32, doc_stride=4, max_query_len=5, train=True)
    ids = feats.inputs["input_ids"][0]
    assert ids.index(tokenizer.sep_token_id) == 1 + 5  # [CLS], 5 question tokens, [SEP]
    assert tokenizer.decode(ids[1:6]) == "what w0 w1 w2 w3"


def _logits(feats, spans: dict[int, tuple[int, int, float]], null: float = 0.0):
    """start/end logits: -10 everywhere, ``null`` on [CLS], and ``score`` on the given (start, end) per window."""
    n, length = len(feats.example_index), len(feats.inputs["input_ids"][0])
    start, end = np.full((n, length), -10.0), np.full((n, length), -10.0)
    start[:, 0] = end[:, 0] = null / 2
    for f, (s, e, score) in spans.items():
        start[f, s] = end[f, e] = score / 2
    return start, end


def _position(feats, f: int, word: int) -> int | None:
    """Token position of word ``w{word}`` in window ``f`` (None if the window does not hold it)."""
    char = " ".join(WORDS[:60]).index(f"w{word} ")
    return next((p for p, o in enumerate(feats.offsets[f]) if o is not None and o[0] == char), None)


def _windows(feats, word: int, owning: bool) -> list[int]:
    """Windows holding ``w{word}`` where it has (``owning``) or lacks the maximum context."""
    found = []
    for f in range(len(feats.offsets)):
        p = _position(feats, f, word)
        if p is not None and feats.max_context[f][p] == owning:
            found.append(f)
    return found


def test_postprocess_picks_best_span_and_respects_max_context(tokenizer):
    ex = _example(30)
    feats = prepare_features(tokenizer, [ex], max_len=32, doc_stride=8, max_query_len=16, train=False)
    (owner,) = _windows(feats, 30, owning=True)
    spans = {owner: (_position(feats, owner, 30), _position(feats, owner, 31), 8.0)}
    # A higher-scoring span in another window, starting on a token that window does not "own": ignored.
    other = next(f for f in _windows(feats, 22, owning=False) if f != owner)
    spans[other] = (_position(feats, other, 22), _position(feats, other, 23), 20.0)
    start, end = _logits(feats, spans)
    preds, null = postprocess([ex], feats, start, end, version_2=False)
    assert preds == {"q": "w30 w31"} and null == {}
    # Given to the window that owns w22, the same span wins.
    (owner22,) = _windows(feats, 22, owning=True)
    spans[owner22] = (_position(feats, owner22, 22), _position(feats, owner22, 23), 20.0)
    start, end = _logits(feats, spans)
    assert postprocess([ex], feats, start, end, version_2=False)[0] == {"q": "w22 w23"}


def test_postprocess_limits_answer_length(tokenizer):
    ex = _example(30)
    feats = prepare_features(tokenizer, [ex], max_len=64, doc_stride=8, max_query_len=16, train=False)
    f = 0
    spans = {f: (_position(feats, f, 10), _position(feats, f, 20), 50.0)}  # 11 tokens; w10..w13 would be 4
    start, end = _logits(feats, spans)
    start[f, _position(feats, f, 12)] = 1.0
    end[f, _position(feats, f, 13)] = 1.0
    preds, _ = postprocess([ex], feats, start, end, version_2=False, max_answer_len=3)
    assert preds["q"] == "w12 w13"


@pytest.mark.parametrize(("null", "expected"), [(30.0, ""), (2.0, "w10 w11")])
def test_postprocess_v2_null_answer(tokenizer, null, expected):
    ex = _example(10, impossible=True)
    feats = prepare_features(tokenizer, [ex], max_len=64, doc_stride=8, max_query_len=16, train=False)
    spans = {0: (_position(feats, 0, 10), _position(feats, 0, 11), 6.0)}
    start, end = _logits(feats, spans, null=null)
    preds, null_diff = postprocess([ex], feats, start, end, version_2=True)
    assert preds["q"] == expected
    # The null score is the smallest over windows: other windows carry `null` too, so the diff is null - 6.
    assert null_diff["q"] == pytest.approx(null - 6.0)
