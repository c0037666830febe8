"""data_prep without Ray: input units, reading, sentence splitting, sample building, tokenizer training."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.format import tokenizer_hash
from data_prep.hub import HfSource
from data_prep.pydocs import write_python_docs_corpus
from data_prep.samples import nsp_samples, packed_samples
from data_prep.sources import ReadCounters, plan_units, read_documents
from data_prep.text import split_sentences
from data_prep.tokenizer import SPECIAL_TOKENS, train_tokenizer

CLS, SEP = 2, 3


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta"]
    docs = []
    for d in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            sentences = [
                " ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "." for _ in range(3)
            ]
            lines.append(f"Doc{d} " + " ".join(sentences))
        docs.append("\n".join(lines))
    return docs


def _all_documents(path, **kwargs) -> list[str]:
    plan = plan_units([path], **kwargs)
    counters = ReadCounters()
    return [d for unit in plan.units for d in read_documents(unit, max_line_length=10_000, counters=counters)]


@pytest.mark.parametrize("unit_bytes", [64, 500, 4096, 1 << 20])
def test_text_units_split_only_between_documents(tmp_path, unit_bytes):
    docs = _documents(40)
    path = tmp_path / "c.txt"
    path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    plan = plan_units([path], unit_bytes=unit_bytes)
    assert len(plan.units) >= (2 if unit_bytes < 4096 else 1)
    assert _all_documents(path, unit_bytes=unit_bytes) == docs


@pytest.mark.parametrize("unit_bytes", [50, 300, 1 << 20])
def test_jsonl_units_split_between_lines_and_group_rows(tmp_path, unit_bytes):
    path = tmp_path / "c.jsonl"
    rows = [f"row {i}" for i in range(50)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    assert _all_documents(path, unit_bytes=unit_bytes) == rows
    grouped = _all_documents(path, unit_bytes=1 << 20, rows_per_document=20)
    assert grouped == ["\n".join(rows[i : i + 20]) for i in range(0, 50, 20)]


def test_bad_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"Good line.\n\xff\xfe broken bytes.\n" + b"x" * 5000 + b"\nAfter.\n\nSecond doc.\n")
    counters = ReadCounters()
    (unit,) = plan_units([path], max_line_length=1000).units
    docs = list(read_documents(unit, max_line_length=1000, counters=counters))
    assert docs == ["Good line.\n\ufffd\ufffd broken bytes.\nAfter.", "Second doc."]
    assert (counters.invalid_utf8_lines, counters.long_lines) == (1, 1)

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "ok"}\nnot json\n[1, 2]\n{"other": 1}\n{"text": 3}\n', encoding="utf-8")
    counters = ReadCounters()
    (unit,) = plan_units([jsonl]).units
    assert list(read_documents(unit, max_line_length=1000, counters=counters)) == ["ok"]
    assert (counters.bad_json_lines, counters.missing_text) == (2, 2)


def test_resolve_inputs_errors_and_skips(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        plan_units([tmp_path / "nope.txt"])
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        plan_units([str(tmp_path / "*.jsonl")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported input type"):
        plan_units([tmp_path / "notes.csv"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("Hello there.\n")
    (tmp_path / "d" / "empty.txt").write_text("")
    (tmp_path / "d" / "x.csv").write_text("a,b\n")
    (tmp_path / "d" / "bad.parquet").write_bytes(b"PAR1 definitely not parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d" / "other.parquet")
    plan = plan_units([tmp_path / "d", str(tmp_path / "d" / "*.txt")])
    assert [u.paths for u in plan.units] == [(str((tmp_path / "d" / "a.txt").resolve()),)]  # de-duplicated
    reasons = {p["path"].rsplit("/", 1)[-1]: p["reason"] for p in plan.skipped_files}
    assert reasons["x.csv"] == "unsupported file type"
    assert reasons["empty.txt"] == "empty file"
    assert reasons["bad.parquet"].startswith("unreadable Parquet file")
    assert "no column 'text'" in reasons["other.parquet"]


def test_parquet_units_are_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(
        pa.table({"text": [f"doc {i}" if i % 7 else None for i in range(100)]}), path, row_group_size=30
    )
    plan = plan_units([path])
    assert [u.start for u in plan.units] == [0, 1, 2, 3]
    counters = ReadCounters()
    docs = [d for u in plan.units for d in read_documents(u, max_line_length=100, counters=counters)]
    assert docs == [f"doc {i}" for i in range(100) if i % 7]
    assert counters.missing_text == 15


def test_hf_source_parsing():
    source = HfSource.parse(
        ["bookcorpus/bookcorpus", "plain_text", "revision=refs/convert/parquet", "rows_per_document=256"]
    )
    assert source == HfSource(
        "bookcorpus/bookcorpus", "plain_text", revision="refs/convert/parquet", rows_per_document=256
    )
    assert HfSource.parse("wikimedia/wikipedia").config is None
    with pytest.raises(ValueError, match="key=value"):
        HfSource.parse(["x", "cfg", "bogus=1"])


def test_sentence_splitter():
    text = 'Dr. Smith met J. R. R. Tolkien in the U.S. in 1950. "Really?" she asked. Yes! it was e.g. fine.'
    assert split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. in 1950.",
        '"Really?" she asked.',
        "Yes! it was e.g. fine.",
    ]
    assert split_sentences("one. two. three", cased=False) == ["one.", "two.", "three"]


def _synthetic_docs(rng: random.Random, n: int) -> list[list[list[int]]]:
    # token ids >= 10 so they never collide with [CLS]=2 / [SEP]=3; doc d uses ids d*1000 + ...
    return [
        [[d * 1000 + 10 + s * 50 + t for t in range(rng.randint(1, 20))] for s in range(rng.randint(1, 15))]
        for d in range(n)
    ]


def test_nsp_samples_are_bert_pairs():
    rng = random.Random(0)
    docs = _synthetic_docs(rng, 60)
    samples = nsp_samples(docs, random.Random(1), seq_len=64, cls_id=CLS, sep_id=SEP)
    assert len(samples) > 100
    for ids, a_len, label, *_ in samples:
        assert len(ids) <= 64 and ids[0] == CLS and ids[a_len - 1] == SEP and ids[-1] == SEP
        a, b = ids[1 : a_len - 1], ids[a_len:-1]
        assert a and b and CLS not in a + b and SEP not in a + b
        same_doc = {t // 1000 for t in a} == {t // 1000 for t in b}
        if label == 0:
            assert same_doc and len({t // 1000 for t in a}) == 1  # B follows A in the same document
        else:
            assert label == 1
    random_share = sum(s.next_sentence_label for s in samples) / len(samples)
    assert 0.4 < random_share < 0.65  # BERT: 50%, plus one-segment chunks, which must take a random B
    assert nsp_samples(docs, random.Random(1), seq_len=64, cls_id=CLS, sep_id=SEP) == samples


def test_packed_samples_fill_sequences():
    docs = _synthetic_docs(random.Random(0), 30)
    samples = packed_samples(docs, random.Random(2), seq_len=64, cls_id=CLS, sep_id=SEP)
    body = [t for ids, *_ in samples for t in ids[1:-1] if t != SEP]
    assert sorted(body) == sorted(t for doc in docs for s in doc for t in s)  # every token exactly once
    for ids, a_len, label, *_ in samples:
        assert ids[0] == CLS and ids[-1] == SEP and ids[-2] != SEP and a_len == len(ids) <= 64 and label == -1
    assert sum(len(s.input_ids) for s in samples) / len(samples) > 0.8 * 64


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_trained_tokenizer_loads_with_autotokenizer_and_is_deterministic(tmp_path, kind):
    from transformers import AutoTokenizer

    texts = _documents(200)
    train_tokenizer(iter(texts), tmp_path / "a", kind=kind, vocab_size=300)
    train_tokenizer(iter(texts), tmp_path / "b", kind=kind, vocab_size=300)
    assert tokenizer_hash(tmp_path / "a") == tokenizer_hash(tmp_path / "b")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id) == (2, 3, 4)
    assert 20 < len(tokenizer) <= 300  # a unigram model may stop short on a 10-word corpus
    encoded = tokenizer("Alpha beta gamma.", "Omega zeta.")
    assert encoded["input_ids"][0] == 2 and encoded["input_ids"][-1] == 3
    assert (
        tokenizer.decode(encoded["input_ids"], skip_special_tokens=True).replace(" ", "")
        == "alphabetagamma.omegazeta."
    )
    assert tokenizer.unk_token_id not in tokenizer("Kappa lambda theta sigma")["input_ids"]


def test_python_docs_corpus(tmp_path):
    path = write_python_docs_corpus(tmp_path)
    text = path.read_text(encoding="utf-8")
    documents = text.strip().split("\n\n")
    assert path.name == "python_docs.txt" and len(documents) == 79
    assert 60_000 < len(text.split()) < 90_000
    assert all(doc.strip() for doc in documents)
