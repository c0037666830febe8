"""ShardReader and MlmCollator on a corpus prepared by the real pipeline (local Ray, generated text)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import word_documents

from data_prep import prepare_corpus
from data_prep.format import MANIFEST_NAME
from sparsebert.data import MlmCollator, ShardReader
from sparsebert.data.read_count import CountingFileSystem

SEQ_LEN = 48


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    (root / "c.txt").write_text(word_documents(150, 0), encoding="utf-8")
    prepare_corpus(
        [root / "c.txt"],
        root / "nsp",
        vocab_size=200,
        seq_len=SEQ_LEN,
        shard_size=37,
        progress=False,
        unit_bytes=8192,
    )
    prepare_corpus(
        [root / "c.txt"],
        root / "spm",
        train_tokenizer="sentencepiece",
        vocab_size=120,
        seq_len=SEQ_LEN,
        shard_size=64,
        packing="full_sentences",
        progress=False,
    )
    return root


def _epoch(reader: ShardReader, epoch: int) -> list[list[int]]:
    """The sample indices of each batch of ``epoch`` (the reader must be at its start)."""
    assert reader.state_dict()["epoch"] == epoch and reader.state_dict()["position"] == 0
    return [b["sample_index"].tolist() for b in itertools.islice(iter(reader), reader.steps_per_epoch)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_cover_the_epoch_and_reshuffle(corpus, world_size):
    B = 5
    readers = [
        ShardReader(corpus / "nsp", rank=r, world_size=world_size, batch_size=B, seed=3, prefetch=r % 2)
        for r in range(world_size)
    ]
    n, G = readers[0].num_samples, world_size * B
    assert n > 200 and len(readers[0]._paths) > 4
    orders = []
    for epoch in range(2):
        per_rank = [_epoch(reader, epoch) for reader in readers]
        assert {len(batches) for batches in per_rank} == {n // G}  # the same number of steps everywhere
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen)) == n - n % G  # disjoint, and only the remainder is left out
        assert all(len(batch) == B for batches in per_rank for batch in batches)
        orders.append([i for step in zip(*per_rank, strict=True) for batch in step for i in batch])
    assert orders[0] != orders[1] and sorted(orders[0][:G]) != list(range(G))  # shuffled, and anew each epoch


def test_global_batches_do_not_depend_on_the_split_into_ranks(corpus):
    def global_batches(world_size: int) -> list[list[int]]:
        readers = [
            ShardReader(corpus / "nsp", rank=r, world_size=world_size, batch_size=6 // world_size, seed=1)
            for r in range(world_size)
        ]
        steps = zip(*(itertools.islice(iter(r), 30) for r in readers), strict=True)
        # Rank r holds positions r, r + world_size, ... of each global batch: interleave them back.
        return [
            [i for row in zip(*(b["sample_index"].tolist() for b in step), strict=True) for i in row]
            for step in steps
        ]

    assert global_batches(1) == global_batches(2) == global_batches(3)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_rank_reads_only_the_row_groups_of_its_lanes(corpus, world_size):
    """Bytes and row groups counted from the reads pyarrow makes (through ``filesystem``), over one epoch."""
    lanes, B = 4, 3
    counts = [CountingFileSystem() for _ in range(world_size)]
    readers = [
        ShardReader(
            corpus / "nsp", rank=r, world_size=world_size, batch_size=B, seed=5, prefetch=r % 2,
            lanes=lanes, filesystem=counts[r].filesystem,
        )
        for r in range(world_size)
    ]  # fmt: skip
    footers = {path: pq.read_metadata(path) for path in (Path(p.path) for p in readers[0]._paths)}
    groups = {(path, j): md.row_group(j) for path, md in footers.items() for j in range(md.num_row_groups)}

    def size(group) -> int:
        return sum(group.column(c).total_compressed_size for c in range(group.num_columns))

    corpus_bytes = sum(size(g) for g in groups.values())
    footer_bytes = sum(md.serialized_size + 8 for md in footers.values())  # a file opened reads its footer
    block_bytes, block_rows = max(size(g) for g in groups.values()), max(g.num_rows for g in groups.values())
    assert len(groups) >= 8 and readers[0].num_samples > lanes * block_rows
    for count in counts:
        count.reset()  # construction read the footers; count what the epoch reads
    seen = []
    for reader in readers:
        seen += [
            i
            for b in itertools.islice(iter(reader), reader.steps_per_epoch)
            for i in b["sample_index"].tolist()
        ]
    n, G = readers[0].num_samples, world_size * B
    assert len(seen) == len(set(seen)) == n - n % G
    mine = lanes // world_size  # lanes per rank; each reads its share of the stream plus <= 2 partial blocks
    for count in counts:
        assert count.total <= corpus_bytes / world_size + 2 * mine * block_bytes + footer_bytes
        rows = sum(groups[path, j].num_rows for path in footers for j in count.row_groups_read(path))
        assert rows <= n / world_size + 2 * mine * block_rows
        # The target: 1.5 / world_size of the corpus plus one window (a row group per lane).
        assert count.total <= 1.5 * corpus_bytes / world_size + lanes * block_bytes + footer_bytes
    assert sum(c.total for c in counts) <= corpus_bytes + 2 * lanes * block_bytes + world_size * footer_bytes


def test_batches_are_padded_bert_inputs(corpus):
    reader = ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=8)
    manifest = json.loads((corpus / "nsp" / MANIFEST_NAME).read_text())
    tokenizer = reader.tokenizer
    batch = next(iter(reader))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (8, SEQ_LEN),
        "token_type_ids": (8, SEQ_LEN),
        "attention_mask": (8, SEQ_LEN),
        "next_sentence_label": (8,),
        "sample_index": (8,),
        "epoch": (8,),
    }
    assert all(v.dtype == torch.int64 for v in batch.values())
    for ids, types, mask in zip(
        batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], strict=True
    ):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert (ids[length:] == tokenizer.pad_token_id).all() and ids[0] == tokenizer.cls_token_id
        assert ids[length - 1] == tokenizer.sep_token_id and not types[length:].any()
        a_length = int((types[:length] == 0).sum())
        assert ids[a_length - 1] == tokenizer.sep_token_id and types[a_length:length].all()
    assert reader.manifest == manifest and reader.tokenizer_dir == corpus / "nsp" / "tokenizer"


def test_resume_mid_epoch_continues_exactly(corpus):
    collator = MlmCollator(corpus / "nsp" / "tokenizer", seed=5)

    def make(rank: int) -> ShardReader:
        return ShardReader(
            corpus / "nsp", rank=rank, world_size=2, batch_size=7, seed=9, collator=collator, prefetch=3
        )

    total = make(0).steps_per_epoch * 2 + 5  # well into the third epoch
    for rank in (0, 1):
        straight = [b for b in itertools.islice(iter(make(rank)), total)]
        for cut in (1, make(rank).steps_per_epoch - 1, make(rank).steps_per_epoch, total - 3):
            first = make(rank)
            it = iter(first)
            head = [next(it) for _ in range(cut)]  # the thread has prefetched beyond this: must not count
            state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
            it.close()
            second = make(rank)
            second.load_state_dict(state)
            tail = list(itertools.islice(iter(second), total - cut))
            for expected, got in zip(straight, head + tail, strict=True):
                for key in expected:  # masked ids and labels too: masking does not depend on history
                    assert torch.equal(expected[key], got[key]), (rank, cut, key)


def test_resume_with_another_world_size_skips_and_repeats_nothing(corpus):
    first = ShardReader(corpus / "nsp", rank=0, world_size=2, batch_size=4, seed=2, epochs=1)
    partner = ShardReader(corpus / "nsp", rank=1, world_size=2, batch_size=4, seed=2, epochs=1)
    seen = [
        i for r in (first, partner) for b in itertools.islice(iter(r), 10) for i in b["sample_index"].tolist()
    ]
    state = first.state_dict()
    assert state == partner.state_dict() and state["position"] == 80
    rest = []
    for rank in range(3):
        reader = ShardReader(corpus / "nsp", rank=rank, world_size=3, batch_size=4, seed=2, epochs=1)
        reader.load_state_dict(state)
        rest += [i for b in reader for i in b["sample_index"].tolist()]
    n = first.num_samples
    assert len(set(seen + rest)) == len(seen) + len(rest) == 80 + (n - 80) // 12 * 12


def test_epochs_limit_and_unshuffled_order(corpus):
    reader = ShardReader(corpus / "nsp", rank=1, world_size=2, batch_size=3, shuffle=False, epochs=2, lanes=4)
    batches = list(reader)
    assert len(batches) == 2 * reader.steps_per_epoch
    n = reader.num_samples
    lane = [k * (n // 4) + min(k, n % 4) for k in range(4)]  # where each lane starts in corpus order
    # Rank 1 holds positions 1, 3, 5 (lanes 1, 3, 1), then 7, 9, 11 (lanes 3, 1, 3): lane k's j-th sample.
    assert batches[0]["sample_index"].tolist() == [lane[1], lane[3], lane[1] + 1]
    assert batches[1]["sample_index"].tolist() == [lane[3] + 1, lane[1] + 2, lane[3] + 2]
    assert reader.state_dict()["epoch"] == 2 and list(reader) == []


def test_state_from_another_run_is_refused(corpus):
    state = ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset"):
        ShardReader(corpus / "spm", rank=0, world_size=1, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lanes"):
        ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=4, seed=1, lanes=8).load_state_dict(
            state
        )
    before_lanes = {k: v for k, v in state.items() if k != "lanes"} | {
        "window_shards": 4
    }  # an older reader's
    with pytest.raises(ValueError, match=r"older reader.*window_shards=4.*start a new run"):
        ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=4, seed=1).load_state_dict(before_lanes)


def _copy(corpus, tmp_path):
    return shutil.copytree(corpus / "nsp", tmp_path / "copy")


def test_bad_shard_directories_are_refused_naming_the_file(corpus, tmp_path):
    data = _copy(corpus, tmp_path)
    make = lambda: ShardReader(data, rank=0, world_size=1, batch_size=4)  # noqa: E731
    shards = sorted(data.glob("shard-*.parquet"))

    shutil.copy(corpus / "spm" / "shard-00000.parquet", data / "extra.parquet")  # foreign
    with pytest.raises(ValueError, match=r"extra\.parquet.*not listed"):
        make()
    (data / "extra.parquet").unlink()

    original = shards[2].read_bytes()
    shards[2].write_bytes(original[:-10])  # truncated
    with pytest.raises(ValueError, match=r"shard-00002\.parquet.*truncated"):
        make()
    shards[2].write_bytes(b"\0" * len(original))  # corrupt, same size
    with pytest.raises(ValueError, match=r"shard-00002\.parquet.*not a readable Parquet"):
        make()
    shards[2].unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00002\.parquet"):
        make()
    shards[2].write_bytes(original)

    tokenizer_json = data / "tokenizer" / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["model"]["vocab"]["zzzz"] = len(spec["model"]["vocab"])  # another vocabulary
    tokenizer_json.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer\.json has hash"):
        make()
    with pytest.raises(ValueError, match=r"tokenizer\.json has hash"):
        ShardReader(
            corpus / "nsp", rank=0, world_size=1, batch_size=4, tokenizer_dir=corpus / "spm" / "tokenizer"
        )
    shutil.copy(corpus / "nsp" / "tokenizer" / "tokenizer.json", tokenizer_json)
    make()

    (data / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        make()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardReader(corpus / "nsp", rank=0, world_size=64, batch_size=64)


def test_read_errors_surface_from_the_prefetch_thread(corpus, tmp_path):
    data = _copy(corpus, tmp_path)
    reader = ShardReader(data, rank=0, world_size=1, batch_size=4, shuffle=False, prefetch=2)
    shard = data / "shard-00003.parquet"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # damaged after the checks, while training
    with pytest.raises(ValueError, match=r"shard-00003\.parquet"):
        list(itertools.islice(iter(reader), 100))


def _masked(collator: MlmCollator, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = collator(batch)
    return batch["input_ids"].numpy(), out["input_ids"].numpy(), out["labels"].numpy()


def test_mlm_masking_rates_and_purity(corpus):
    reader = ShardReader(corpus / "nsp", rank=0, world_size=1, batch_size=64, seed=4)
    tokenizer = reader.tokenizer
    collator = MlmCollator(tokenizer, seed=11)
    batches = list(itertools.islice(iter(reader), 6))
    ids, masked, labels = (
        np.concatenate(x) for x in zip(*(_masked(collator, b) for b in batches), strict=True)
    )
    attention = np.concatenate([b["attention_mask"].numpy() for b in batches]).astype(bool)
    special = np.isin(ids, tokenizer.all_special_ids)
    chosen = labels != -100
    assert not (chosen & (special | ~attention)).any() and (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all() and chosen.any(axis=1).all()
    assert 0.13 < chosen.sum() / (attention & ~special).sum() < 0.17
    as_mask = (masked[chosen] == tokenizer.mask_token_id).mean()
    kept = (masked[chosen] == ids[chosen]).mean()
    assert 0.77 < as_mask < 0.83 and 0.07 < kept < 0.15  # 10% kept + random draws of the same token
    assert not np.isin(masked[chosen & (masked != tokenizer.mask_token_id)], tokenizer.all_special_ids).any()

    batch = batches[0]
    again = MlmCollator(tokenizer, seed=11)(batch)
    assert torch.equal(again["input_ids"], collator(batch)["input_ids"])  # a pure function of its inputs
    shuffled = {k: v.flip(0) for k, v in batch.items()}
    assert torch.equal(
        collator(shuffled)["labels"], collator(batch)["labels"].flip(0)
    )  # per sample, not per batch
    next_epoch = dict(batch, epoch=batch["epoch"] + 1)
    assert not torch.equal(collator(next_epoch)["labels"], collator(batch)["labels"])  # new masks each epoch
    with pytest.raises(ValueError, match="sample_index"):
        collator({"input_ids": batch["input_ids"]})


@pytest.mark.parametrize("name", ["nsp", "spm"])
def test_whole_word_masking_masks_all_pieces_of_a_word(corpus, name):
    reader = ShardReader(corpus / name, rank=0, world_size=1, batch_size=64)
    tokenizer = reader.tokenizer
    collator = MlmCollator(reader.tokenizer_dir, whole_word=True, seed=2)
    batch = next(iter(reader))
    ids, _, labels = _masked(collator, batch)
    checked = 0
    for row, label_row in zip(ids, labels, strict=True):
        words = tokenizer.convert_ids_to_tokens(row.tolist())
        chosen = label_row != -100
        for j in range(1, len(words)):
            continuation = words[j].startswith("##") if name == "nsp" else not words[j].startswith("▁")
            if (
                continuation
                and row[j] not in tokenizer.all_special_ids
                and row[j - 1] not in tokenizer.all_special_ids
            ):
                assert chosen[j] == chosen[j - 1], (words[j - 1], words[j])
                checked += int(chosen[j])
    assert checked > 10  # multi-piece words were masked as a whole
    assert 0.1 < (labels != -100).sum() / (batch["attention_mask"].sum() - 3 * 64).item() < 0.22
