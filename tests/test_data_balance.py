"""Sentences and NSP balance on text the former splitter got wrong: sentences that start in lower case,
and caseless (Chinese-like) text. The sentence counts must be near the truth and the share of "random
next" samples near one half; the manifest's ``nsp`` section reports both, with a warning when off."""

from __future__ import annotations

import pytest

from data_prep import prepare_corpus, synthetic, write_python_docs_corpus
from data_prep.sources import ReadCounters
from data_prep.text import document_sentences

SETTINGS = {"vocab_size": 1000, "seq_len": 128, "shard_size": 500, "progress": False, "num_workers": 2}


@pytest.mark.parametrize("make", [synthetic.lowercase_corpus, synthetic.caseless_corpus])
def test_sentences_and_nsp_balance_on_hard_text(ray_local, tmp_path, make):
    docs = make(300, seed=3)
    corpus = synthetic.write_corpus(tmp_path / "corpus.txt", docs)
    manifest = prepare_corpus([corpus], tmp_path / "out", **SETTINGS)
    truth = synthetic.sentence_count(docs)
    assert abs(manifest["counts"]["sentences"] - truth) <= 0.1 * truth
    nsp = manifest["nsp"]
    assert 0.45 <= nsp["random_next_ratio"] <= 0.55 and "warning" not in nsp
    assert sum(nsp["segments_per_sample"].values()) == manifest["counts"]["samples"]

    # The former splitter, kept as an option, finds a fraction of the sentences, and the manifest says so.
    rules = prepare_corpus([corpus], tmp_path / "rules", sentence_splitter="rules", **SETTINGS)
    assert rules["counts"]["sentences"] < 0.5 * truth
    assert rules["config"]["sentence_splitter"] == "rules"
    assert "single sentence" in rules["nsp"]["warning"] and "--sentence-splitter" in rules["nsp"]["warning"]


def test_splitters_on_lines():
    counters = ReadCounters()
    text = "the Thames flows through London. it is 346 km long.\n今天天气很好。我们去公园吧！好的"
    assert document_sentences(text, max_line_length=1000, counters=counters) == [
        "the Thames flows through London.",
        "it is 346 km long.",
        "今天天气很好。",
        "我们去公园吧！",
        "好的",
    ]
    assert len(document_sentences(text, max_line_length=1000, counters=counters, splitter="rules")) == 2
    with pytest.raises(ValueError, match="sentence splitter 'punkt'"):
        document_sentences(text, max_line_length=1000, counters=counters, splitter="punkt")


def test_python_docs_corpus_goes_into_a_directory_and_makes_parents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = write_python_docs_corpus("data/")  # README's command, from a fresh clone: no data/ yet
    assert written.resolve() == tmp_path / "data" / "python_docs.txt" and written.stat().st_size > 100_000
    assert write_python_docs_corpus(tmp_path / "data") == written.resolve()  # an existing directory
    nested = write_python_docs_corpus(tmp_path / "a" / "b" / "docs.txt")  # a file in missing directories
    assert nested.read_bytes() == written.read_bytes()
