"""The corpus pipeline end to end on a real local Ray (the session's ``ray_local``), on generated text."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import PrepOptions, prepare_corpus
from data_prep.format import FORMAT_VERSION, MANIFEST_NAME, tokenizer_hash

SEQ_LEN = 64
_SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ne", "so", "vi", "pe", "da", "gu", "ze", "bo", "fi"]


def make_corpus(n_docs: int = 120, topics: int = 8, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """Documents whose content words come from one of ``topics`` disjoint word lists, so a segment's
    document of origin can be told from its words. Returns the documents and word → topic."""
    rng = random.Random(seed)
    topic_of: dict[str, int] = {}
    words: list[list[str]] = []
    for t in range(topics):
        words.append([])
        while len(words[t]) < 30:
            word = "".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4)))
            if word not in topic_of:
                topic_of[word] = t
                words[t].append(word)
    docs = []
    for _ in range(n_docs):
        t = rng.randrange(topics)
        lines = []
        for _ in range(rng.randint(1, 8)):
            sentences = []
            for _ in range(rng.randint(1, 4)):
                body = [
                    rng.choice(words[t]) if rng.random() < 0.7 else rng.choice(["the", "of", "and"])
                    for _ in range(rng.randint(3, 14))
                ]
                sentences.append(" ".join(body).capitalize() + rng.choice([".", ".", "?", "!"]))
            lines.append(" ".join(sentences))
        docs.append("\n".join(lines))
    return docs, topic_of


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def read_rows(out: Path) -> list[dict]:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return [row for shard in manifest["shards"] for row in pq.read_table(out / shard["file"]).to_pylist()]


SMALL = {
    "vocab_size": 400,
    "seq_len": SEQ_LEN,
    "shard_size": 100,
    "unit_bytes": 4096,
    "docs_per_group": 16,
    "progress": False,
}


def prepare(inputs, out: Path, **kwargs) -> dict:
    return prepare_corpus(inputs, out, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs, topic_of = make_corpus()
    return write_txt(root / "corpus.txt", docs), docs, topic_of


@pytest.fixture(scope="module")
def prepared(ray_local, corpus, tmp_path_factory):
    """The same corpus prepared with 1 worker (settings as keywords) and with 2 (a ``PrepOptions``)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare([corpus[0]], root / "w1", num_workers=1)
    prepare_corpus([corpus[0]], root / "w2", PrepOptions(**SMALL, num_workers=2))
    return {1: root / "w1", 2: root / "w2"}


def _without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def test_output_identical_whatever_the_number_of_workers(prepared):
    one, two = (json.loads((prepared[w] / MANIFEST_NAME).read_text()) for w in (1, 2))
    assert one["counts"]["units"] > 10  # the work really was split
    assert _without_run(one) == _without_run(two)  # includes every shard's sha256 and the tokenizer hash
    for shard in one["shards"]:
        assert (prepared[1] / shard["file"]).read_bytes() == (prepared[2] / shard["file"]).read_bytes()
    assert (prepared[1] / "tokenizer" / "tokenizer.json").read_bytes() == (
        prepared[2] / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def test_manifest_describes_the_output(prepared, corpus):
    out = prepared[2]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (
        manifest["format_version"] == FORMAT_VERSION
        and manifest["seq_len"] == SEQ_LEN
        and manifest["seed"] == 0
    )
    assert manifest["sources"] == [
        {"type": "text", "path": str(corpus[0].resolve()), "bytes": corpus[0].stat().st_size}
    ]
    assert manifest["counts"]["documents"] == len(corpus[1])
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(out / "tokenizer")
    sizes = [s["samples"] for s in manifest["shards"]]
    assert all(n == 100 for n in sizes[:-1]) and 0 < sizes[-1] <= 100
    assert sum(sizes) == manifest["counts"]["samples"] == len(read_rows(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, "tokenizer", *(s["file"] for s in manifest["shards"])]
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_manifest_records_the_settings_as_before(prepared):
    """The settings' keys and values in the manifest are those of the format's first version: manifests of
    the same input stay byte-identical."""
    manifest = json.loads((prepared[2] / MANIFEST_NAME).read_text())
    assert (manifest["seq_len"], manifest["seed"], manifest["packing"]) == (SEQ_LEN, 0, "nsp")
    assert manifest["config"] == {
        "doc_per_file": False,
        "docs_per_group": 16,
        "hf_datasets": [],
        "lowercase": True,
        "max_line_length": 4000000,
        "random_next_prob": 0.5,
        "rows_per_document": 1,
        "sentence_splitter": "sentencex",
        "shard_size": 100,
        "short_seq_prob": 0.1,
        "text_column": "text",
        "tokenizer_sample_bytes": 268435456,
        "unit_bytes": 4096,
    }
    assert sorted(manifest["run"]) == ["created_at", "num_workers", "ray_address", "seconds"]
    assert (manifest["run"]["num_workers"], manifest["run"]["ray_address"]) == (2, None)
    top = (
        "config counts format_version nsp packing repaired run seed seq_len shards skipped sources tokenizer"
    )
    assert sorted(manifest) == top.split()


def test_samples_are_well_formed_bert_pairs(prepared, corpus):
    from transformers import AutoTokenizer

    out = prepared[1]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    specials = set(tokenizer.all_special_ids)
    topic_of = corpus[2]
    rows = read_rows(out)
    same_topic = {0: [], 1: []}
    for row in rows:
        ids, a_len, label = row["input_ids"], row["a_length"], row["next_sentence_label"]
        assert len(ids) <= SEQ_LEN and ids[0] == tokenizer.cls_token_id
        assert ids[a_len - 1] == tokenizer.sep_token_id and ids[-1] == tokenizer.sep_token_id
        a, b = ids[1 : a_len - 1], ids[a_len:-1]
        assert a and b and not specials & set(a + b)
        # Truncation may cut the edge words of a segment (into another topic's word): judge by the inner ones.
        topics = [
            {topic_of[w] for w in tokenizer.decode(seg).split()[1:-1] if w in topic_of} for seg in (a, b)
        ]
        if topics[0] and topics[1]:
            same_topic[label].append(topics[0] == topics[1] and len(topics[0]) == 1)
    assert all(same_topic[0])  # "is next": B continues A's document
    assert sum(same_topic[1]) / len(same_topic[1]) < 0.35  # random: another document (1 in 8 share a topic)
    random_share = sum(r["next_sentence_label"] for r in rows) / len(rows)
    assert 0.4 < random_share < 0.65
    short = sum(len(r["input_ids"]) < SEQ_LEN // 2 for r in rows) / len(rows)
    assert 0.02 < short < 0.5  # short_seq_prob = 0.1 plus documents' ends


@pytest.mark.parametrize(("packing", "fill"), [("full_sentences", 0.75), ("padding_free", 0.95)])
def test_packing_without_nsp_records_where_documents_begin(ray_local, corpus, tmp_path, packing, fill):
    manifest = prepare([corpus[0]], tmp_path / "out", packing=packing, num_workers=2)
    rows = read_rows(tmp_path / "out")
    assert manifest["packing"] == packing and "nsp_random_next" not in manifest["counts"]
    assert set(rows[0]) == {"input_ids", "a_length", "document_starts"}
    for row in rows:
        assert (
            row["input_ids"][0] == 2
            and row["input_ids"][-1] == 3
            and row["a_length"] == len(row["input_ids"]) <= SEQ_LEN
        )
        assert all(0 < start < len(row["input_ids"]) for start in row["document_starts"])
    assert any(row["document_starts"] for row in rows)  # samples do span documents
    assert sum(len(r["input_ids"]) for r in rows) / len(rows) > fill * SEQ_LEN
    from sparsebert.data import ShardReader

    batch = next(iter(ShardReader(tmp_path / "out", rank=0, world_size=1, batch_size=8, documents=True)))
    for ids, index in zip(batch["document_ids"].tolist(), batch["sample_index"].tolist(), strict=True):
        starts = rows[index]["document_starts"]
        assert ids == [sum(start <= position for start in starts) for position in range(SEQ_LEN)]


def test_document_ids_need_a_corpus_that_records_documents(prepared):
    from sparsebert.data import ShardReader

    with pytest.raises(ValueError, match=r"records no document boundaries .*--packing full_sentences"):
        ShardReader(prepared[1], rank=0, world_size=1, batch_size=2, documents=True)


def test_existing_tokenizer_is_used_as_is(ray_local, prepared, corpus, tmp_path):
    manifest = prepare([corpus[0]], tmp_path / "out", tokenizer=prepared[1] / "tokenizer", num_workers=2)
    assert manifest["tokenizer"]["source"].startswith("pretrained:")
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(prepared[1] / "tokenizer")
    assert read_rows(tmp_path / "out") == read_rows(prepared[1])


def test_jsonl_parquet_and_directory_inputs_with_skips(ray_local, tmp_path):
    docs, _ = make_corpus(40, seed=3)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    lines = [json.dumps({"text": d}) for d in docs[:20]] + ["{broken", json.dumps({"title": "no text"})]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": [*docs[20:], None]}), src / "nested" / "b.parquet", row_group_size=7)
    (src / "nested" / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (src / "readme.md").write_text("not a corpus file")
    manifest = prepare([src], tmp_path / "out", num_workers=2)
    assert manifest["counts"]["documents"] == 40
    assert {s["type"] for s in manifest["sources"]} == {"jsonl", "parquet"}
    skipped = manifest["skipped"]
    assert (skipped["bad_json_lines"], skipped["missing_text"]) == (1, 2)
    reasons = {Path(f["path"]).name: f["reason"] for f in skipped["files"]}
    assert reasons["readme.md"] == "unsupported file type" and "Parquet" in reasons["corrupt.parquet"]


def test_parquet_damaged_past_its_footer_skips_only_that_row_group(ray_local, tmp_path):
    docs, _ = make_corpus(40, seed=7)
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=20)
    data = bytearray(path.read_bytes())
    page = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    data[page + 20 : page + 60] = b"\xab" * 40  # the footer still reads; row group 1's page header does not
    path.write_bytes(bytes(data))
    manifest = prepare([path], tmp_path / "out", num_workers=2)
    assert manifest["counts"]["documents"] == 20
    (failure,) = manifest["skipped"]["files"]
    assert failure["path"] == str(path.resolve()) and "parquet unit 1" in failure["reason"]


def test_non_utf8_and_absurdly_long_lines_are_counted(ray_local, tmp_path):
    docs, _ = make_corpus(30, seed=4)
    raw = (
        "\n\n".join(docs).encode()
        + b"\n\nCaf\xe9 au lait is hot.\nOne more \xff line.\n\n"
        + b"word " * 4000
        + b"\n"
    )
    (tmp_path / "c.txt").write_bytes(raw)
    manifest = prepare([tmp_path / "c.txt"], tmp_path / "out", max_line_length=10_000, num_workers=1)
    assert manifest["repaired"]["invalid_utf8_lines"] == 2
    assert manifest["skipped"]["long_lines"] == 1
    assert manifest["counts"]["documents"] == 31  # the long line's document had nothing else


def test_one_document_per_file(ray_local, tmp_path):
    docs, _ = make_corpus(12, seed=5)
    for i, doc in enumerate(docs):  # blank lines inside a file do not split it
        (tmp_path / f"book{i:02d}.txt").write_text(doc.replace("\n", "\n\n"), encoding="utf-8")
    manifest = prepare([str(tmp_path / "book*.txt")], tmp_path / "out", doc_per_file=True, num_workers=2)
    assert manifest["counts"]["documents"] == 12 and manifest["config"]["doc_per_file"]


@pytest.mark.slow  # the datasets library's import and load in the Ray workers
def test_local_hugging_face_dataset(ray_local, tmp_path):
    docs, _ = make_corpus(30, seed=6)
    sentences = [line for doc in docs for line in doc.split("\n")]
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"sentence": sentences}), tmp_path / "hub" / "train-0.parquet", row_group_size=40)
    manifest = prepare(
        [], tmp_path / "out", hf_datasets=[[str(tmp_path / "hub"), "column=sentence", "rows_per_document=10"]]
    )
    assert manifest["config"]["hf_datasets"] == [
        {
            "name": str(tmp_path / "hub"),
            "config": None,
            "split": "train",
            "column": "sentence",
            "revision": None,
            "rows_per_document": 10,
        }
    ]
    (source,) = manifest["sources"]
    assert (
        source["type"] == "huggingface" and source["units"] >= 2 and source["commit"] is None
    )  # by row group
    assert manifest["counts"]["documents"] == -(-len(sentences) // 10)  # 10 rows a document (40 per unit)
    assert manifest["counts"]["samples"] > 0


def test_errors_leave_no_half_written_output(ray_local, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out")
    (tmp_path / "blank.txt").write_text("\n \n\t\n\n  \n")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare([tmp_path / "blank.txt"], tmp_path / "out")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        prepare([corpus[0]], tmp_path / "out", tokenizer=tmp_path / "no-tokenizer-here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]  # neither output nor staging

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare([corpus[0]], tmp_path / "out")
    prepare([corpus[0]], tmp_path / "out", overwrite=True, num_workers=2)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / MANIFEST_NAME).exists()


def test_empty_corpus_after_reading(ray_local, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"title": "x"}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare([tmp_path / "c.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cluster_config_is_a_valid_ray_cluster_file():
    import jsonschema
    import ray
    import yaml

    root = Path(__file__).resolve().parent.parent
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((root / "cluster" / "prep.yaml").read_text())
    jsonschema.validate(config, schema)
    assert (root / "data_prep" / "cli.py").is_file()  # the script its usage line submits


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, timeout=timeout
    )


def test_command_line_lists_its_flags_and_names_a_missing_input(tmp_path):
    help_text = _cli("--help").stdout
    flags = [
        "--input", "--output", "--tokenizer", "--train-tokenizer", "--vocab-size", "--text-column",
        "--hf-dataset", "--hf-column", "--seq-len", "--seed", "--shard-size", "--num-workers", "--ray-address",
        "--packing", "--lowercase", "--no-lowercase", "--overwrite",
    ]  # fmt: skip
    assert [flag for flag in flags if flag not in help_text] == []
    missing = _cli("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and "input not found" in missing.stderr


@pytest.mark.slow
def test_command_line_starts_and_stops_its_own_ray(corpus, tmp_path):
    """The CLI in a fresh process: no Ray running, so it starts a local one and shuts it down."""
    done = _cli(
        "--input", str(corpus[0]), "--output", str(tmp_path / "out"), "--train-tokenizer", "sentencepiece",
        "--vocab-size", "300", "--seq-len", "48", "--num-workers", "2", "--no-lowercase", "--quiet",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["seq_len"] == 48 and manifest["tokenizer"]["source"] == "trained:sentencepiece"
    assert manifest["tokenizer"]["class"] == "AlbertTokenizer" and not manifest["tokenizer"]["lowercase"]
