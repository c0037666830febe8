"""The validation split: written by ``data_prep`` (whole documents, the same whatever the workers, recorded in
the manifest) and read back by ``ShardReader(split="validation")`` (every sample once per pass, every rank the
same number of batches, identical passes). Real local Ray, generated text whose documents carry marker words."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_prep import prepare_corpus
from data_prep.format import MANIFEST_NAME, check_shards, file_sha256, load_manifest
from data_prep.units import held_out
from sparsebert.data import MlmCollator, ShardReader

SEQ_LEN = 48
SEED = 3
FRACTION = 0.25
WORDS = [
    "the",
    "of",
    "and",
    "river",
    "stone",
    "light",
    "green",
    "quiet",
    "morning",
    "window",
    "paper",
    "garden",
]
MARKER = re.compile(r"\bmk\d{3}q\b")
SMALL = {
    "vocab_size": 300,
    "seq_len": SEQ_LEN,
    "shard_size": 40,
    "unit_bytes": 2048,
    "docs_per_group": 8,
    "seed": SEED,
    "progress": False,
}


def marked_docs(n: int, first: int = 0, seed: int = 0) -> list[str]:
    """``n`` documents, document ``i`` carrying its marker ``mk<i>q`` in every sentence (so every sample of
    it does, whatever segment of it a sample takes)."""
    rng = random.Random(seed)
    docs = []
    for i in range(first, first + n):
        lines = []
        for _ in range(rng.randint(2, 6)):
            sentences = []
            for _ in range(rng.randint(1, 3)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
                words.insert(rng.randint(1, len(words) - 1), f"mk{i:03d}q")
                sentences.append(" ".join(words).capitalize() + ".")
            lines.append(" ".join(sentences))
        docs.append("\n".join(lines))
    return docs


def write(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def shard_rows(directory: Path, shards: list[dict]) -> list[dict]:
    return [row for s in shards for row in pq.read_table(directory / s["file"]).to_pylist()]


def markers(out: Path, split: str) -> set[int]:
    """Document numbers whose marker appears in the decoded samples of ``split``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    manifest = load_manifest(out)
    directory, shards = (out, manifest["shards"]) if split == "train" else (out / "validation", None)
    shards = shards if shards is not None else manifest["validation"]["shards"]
    found = set()
    for row in shard_rows(directory, shards):
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        found |= {int(m[2:5]) for m in MARKER.findall(text)}
    return found


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return marked_docs(160)


@pytest.fixture(scope="module")
def prepared(ray_local, docs, tmp_path_factory):
    """The corpus with a held-out fraction, prepared with 1 and with 2 workers, and without a split."""
    root = tmp_path_factory.mktemp("split")
    source = write(root / "docs.txt", docs)
    for workers in (1, 2):
        prepare_corpus(
            [source], root / f"w{workers}", validation_fraction=FRACTION, num_workers=workers, **SMALL
        )
    prepare_corpus([source], root / "plain", num_workers=2, **SMALL)
    return root


def test_documents_are_wholly_in_one_split(prepared, docs):
    out = prepared / "w2"
    train, validation = markers(out, "train"), markers(out, "validation")
    assert not train & validation  # no document's text is in both splits
    expected = {i for i, doc in enumerate(docs) if held_out(doc, SEED, FRACTION)}
    assert validation == expected and train == set(range(len(docs))) - expected  # the recorded rule, all seen
    assert 0.15 < len(expected) / len(docs) < 0.35


def test_the_split_is_the_same_whatever_the_number_of_workers(prepared):
    one, two = (json.loads((prepared / w / MANIFEST_NAME).read_text()) for w in ("w1", "w2"))
    assert one["counts"]["units"] > 5  # the work really was split
    one.pop("run"), two.pop("run")
    assert one == two  # every shard's sha256 of both splits included
    for shard in one["validation"]["shards"]:
        path = Path("validation") / shard["file"]
        assert (prepared / "w1" / path).read_bytes() == (prepared / "w2" / path).read_bytes()


def test_manifest_records_the_split(prepared, docs):
    out = prepared / "w2"
    manifest = load_manifest(out)
    section = manifest["validation"]
    assert section["dir"] == "validation"
    assert section["config"] == {"validation_fraction": FRACTION, "validation_inputs": []}
    assert "sha256" in section["selection"] and section["sources"] == manifest["sources"]
    held = sum(held_out(doc, SEED, FRACTION) for doc in docs)
    assert section["counts"]["documents"] == held
    assert manifest["counts"]["documents"] == len(docs) - held  # the training counts are the training split's
    rows = shard_rows(out / "validation", section["shards"])
    assert section["counts"]["samples"] == sum(s["samples"] for s in section["shards"]) == len(rows)
    assert section["counts"]["shards"] == len(section["shards"]) >= 2
    assert section["counts"]["nsp_random_next"] == sum(r["next_sentence_label"] for r in rows)
    for shard in section["shards"]:
        assert shard["sha256"] == file_sha256(out / "validation" / shard["file"])
    check_shards(out, manifest, verify_checksums=True, split="validation")
    check_shards(
        out, manifest, verify_checksums=True
    )  # validation/ is no foreign file of the training shards
    # A run without a split writes no section (its manifest is what it was before the option existed).
    plain = load_manifest(prepared / "plain")
    assert "validation" not in plain and not (prepared / "plain" / "validation").exists()
    assert plain["counts"]["documents"] == len(docs)


def test_a_separate_validation_input(ray_local, prepared, tmp_path):
    train_docs, held_docs = marked_docs(60, seed=1), marked_docs(20, first=500, seed=2)
    train_file, held_file = write(tmp_path / "train.txt", train_docs), write(tmp_path / "held.txt", held_docs)
    manifest = prepare_corpus(
        [train_file], tmp_path / "out", validation_inputs=[held_file], num_workers=2, **SMALL
    )
    section = manifest["validation"]
    assert section["config"] == {"validation_fraction": 0.0, "validation_inputs": [str(held_file)]}
    assert section["sources"] == [
        {"type": "text", "path": str(held_file.resolve()), "bytes": held_file.stat().st_size}
    ]
    assert section["counts"]["documents"] == 20 and manifest["counts"]["documents"] == 60
    assert markers(tmp_path / "out", "train") == set(range(60))
    assert markers(tmp_path / "out", "validation") == set(range(500, 520))
    with pytest.raises(ValueError, match="both a training and a validation input"):
        prepare_corpus([train_file], tmp_path / "again", validation_inputs=[held_file, train_file], **SMALL)
    assert not (tmp_path / "again").exists()


def test_an_empty_validation_split_is_an_error(ray_local, prepared, tmp_path):
    with pytest.raises(ValueError, match="empty validation split"):
        prepare_corpus([prepared / "docs.txt"], tmp_path / "out", validation_fraction=1e-12, **SMALL)
    assert not [p for p in tmp_path.iterdir()]  # neither output nor staging left behind


def test_corpora_without_a_split_still_read(prepared, tmp_path):
    plain = prepared / "plain"
    assert ShardReader.validation(plain, rank=0, world_size=1, batch_size=4) is None
    with pytest.raises(ValueError, match=r"no validation split.*--validation-fraction"):
        ShardReader(plain, rank=0, world_size=1, batch_size=4, split="validation")
    reader = ShardReader(plain, rank=0, world_size=1, batch_size=4)
    assert next(iter(reader))["input_ids"].shape == (4, SEQ_LEN)
    # A corpus written with a split, its manifest stripped of the section: the old reader's view.
    old = shutil.copytree(prepared / "w2", tmp_path / "old")
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["validation"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    shutil.rmtree(old / "validation")
    assert ShardReader.validation(old, rank=0, world_size=1, batch_size=4) is None
    assert ShardReader(old, rank=0, world_size=1, batch_size=4).num_samples == manifest["counts"]["samples"]


def test_a_damaged_validation_shard_is_refused_naming_it(prepared, tmp_path):
    data = shutil.copytree(prepared / "w2", tmp_path / "copy")
    shard = data / "validation" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"validation/shard-00001\.parquet.*truncated"):
        ShardReader(data, rank=0, world_size=1, batch_size=4, split="validation")
    ShardReader(data, rank=0, world_size=1, batch_size=4)  # the training split does not read it


def _collator(out: Path) -> MlmCollator:
    return MlmCollator(out / "tokenizer", seed=7)


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 8), (2, 5), (3, 7), (4, 64)])
def test_a_pass_covers_the_split_once_with_equal_batches_per_rank(prepared, world_size, batch_size):
    out = prepared / "w2"
    readers = [
        ShardReader.validation(
            out, rank=r, world_size=world_size, batch_size=batch_size, collator=_collator(out), prefetch=r % 2
        )
        for r in range(world_size)
    ]
    n = readers[0].num_samples
    assert n == load_manifest(out)["validation"]["counts"]["samples"]
    steps = -(-n // (world_size * batch_size))
    passes = [list(reader) for reader in readers]
    assert {len(batches) for batches in passes} == {steps} and all(
        r.steps_per_epoch == steps for r in readers
    )
    seen = []
    for batches in passes:
        for batch in batches:
            assert set(batch) == {
                *("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"),
                *("sample_index", "epoch"),
            }
            assert batch["input_ids"].shape == batch["labels"].shape == (batch_size, SEQ_LEN)
            assert not batch["epoch"].any()
            pad = batch["sample_index"] < 0
            assert (batch["labels"][pad] == -100).all() and (batch["next_sentence_label"][pad] == -100).all()
            assert (batch["labels"][~pad] != -100).any(dim=1).all()  # real rows are masked for MLM
            assert (batch["next_sentence_label"][~pad] >= 0).all()
            seen += batch["sample_index"][~pad].tolist()
    assert sorted(seen) == list(range(n))  # every sample exactly once, ranks disjoint


def test_passes_are_identical_and_do_not_depend_on_the_world_size(prepared):
    out = prepared / "w2"
    reader = ShardReader.validation(
        out, rank=0, world_size=1, batch_size=6, collator=_collator(out), device="cpu"
    )
    first, second = list(reader), list(reader)
    assert len(first) == len(second) == reader.steps_per_epoch
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The same samples are masked the same way when two ranks share the pass.
    single = {
        i: row for b in first for i, row in zip(b["sample_index"].tolist(), b["input_ids"], strict=True)
    }
    for rank in range(2):
        partial = ShardReader.validation(out, rank=rank, world_size=2, batch_size=3, collator=_collator(out))
        for batch in itertools.islice(iter(partial), 4):
            for i, row in zip(batch["sample_index"].tolist(), batch["input_ids"], strict=True):
                if i >= 0:
                    assert torch.equal(row, single[i])
    with pytest.raises(ValueError, match="no position"):
        reader.load_state_dict(reader.state_dict())


def test_evaluation_over_a_pass_does_not_depend_on_the_world_size(prepared, monkeypatch):
    """What the trainer runs: the validation reader into ``evaluate``. Three ranks (padding rows included,
    combined as ``all_mean`` would) give what one rank gives."""
    from sparsebert import SparseBertConfig, SparseBertForPreTraining
    from sparsebert.train import distributed as ds_setup
    from sparsebert.train.validation import evaluate

    out = prepared / "w2"
    torch.manual_seed(0)
    tokenizer_size = len(ShardReader.validation(out, rank=0, world_size=1, batch_size=1).tokenizer)
    model = SparseBertForPreTraining(
        SparseBertConfig(
            vocab_size=tokenizer_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=SEQ_LEN, attention_pattern="star",
        )
    ).train()  # fmt: skip

    def reader(rank: int, world_size: int) -> ShardReader:
        return ShardReader.validation(
            out, rank=rank, world_size=world_size, batch_size=7, collator=_collator(out), device="cpu"
        )

    single = evaluate(model, reader(0, 1), nsp=True)
    assert model.training and all(np.isfinite(list(single.values())))
    assert evaluate(model, reader(0, 1), nsp=True) == single
    shares = []
    monkeypatch.setattr(ds_setup, "all_mean", lambda t: shares.append(t) or t)
    for rank in range(2):
        evaluate(model, reader(rank, 3), nsp=True)
    monkeypatch.setattr(ds_setup, "all_mean", lambda t: (t + sum(shares)) / 3)
    combined = evaluate(model, reader(2, 3), nsp=True)
    assert combined.keys() == single.keys()
    assert all(np.isclose(combined[k], single[k], rtol=1e-5) for k in single)
