"""GLUE TSV and SQuAD JSON loading: every official layout parses, malformed files name file, line and column."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from eval.glue_data import DataFormatError, examples_from_hub_rows, load_glue, read_glue_tsv
from eval.squad_data import examples_from_hub_rows as squad_from_hub_rows
from eval.squad_data import load_squad, read_squad_json
from eval.tasks import ALL_TASKS, GLUE_TASKS, TASKS, parse_tasks

MNLI_COLS = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2"
)
# One train/dev file per task, in the GLUE distribution's own columns (rows adapted from the real files).
GLUE_FILES = {
    "CoLA/train.tsv": "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
    "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n",
    "SST-2/train.tsv": "sentence\tlabel\nit 's a charming and often affecting journey . \t1\nunflinchingly bleak \t0\n",
    # MRPC keeps the byte-order mark of Microsoft's release in front of "Quality".
    "MRPC/train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\tReferring to him as " the witness " .\n',
    "STS-B/train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a flute.\tA man is playing a bamboo flute.\t3.800\n",
    "QQP/train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration is enough?\t0\n",
    "MNLI/train.tsv": f"{MNLI_COLS}\tlabel1\tgold_label\n"
    "0\t31193\t31193n\tgovernment\t(\t(\t(\t(\tConceptually cream skimming has two basic dimensions.\t"
    "Product and geography are what make cream skimming work. \tneutral\tneutral\n",
    "MNLI/dev_matched.tsv": f"{MNLI_COLS}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    "0\t63735\t63735n\tslate\t(\t(\t(\t(\tThe new rights are nice enough\tEveryone really likes the newest benefits \t"
    "neutral\tentailment\tneutral\tneutral\tneutral\tneutral\n",
    "MNLI/dev_mismatched.tsv": f"{MNLI_COLS}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    "0\t75290\t75290c\tletters\t(\t(\t(\t(\tYour contribution helped.\tIt was a waste.\t"
    "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n",
    "QNLI/train.tsv": "index\tquestion\tsentence\tlabel\n"
    "0\tWhat came into force after the new constitution was herald?\tAs of that day, the new constitution "
    "heralding the Second Republic came into force.\tentailment\n",
    "RTE/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
    "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment\n",
    "WNLI/train.tsv": "index\tsentence1\tsentence2\tlabel\n"
    "0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\tThe carrot had a hole.\t1\n",
}
EXPECTED = {  # task: (split, first example's text_a prefix, text_b prefix or None, label)
    "cola": ("train", "Our friends", None, 1),
    "sst2": ("train", "it 's a charming", None, 1),
    "mrpc": ("train", "Amrozi accused", 'Referring to him as "', 1),
    "stsb": ("train", "A plane", "An air plane", 5.0),
    "qqp": ("train", "How is the life", "Which level", 0),
    "mnli": ("train", "Conceptually", "Product and", 1),  # neutral
    "qnli": ("train", "What came", "As of that day", 0),  # entailment
    "rte": ("train", "No Weapons", "Weapons of", 1),  # not_entailment
    "wnli": ("train", "I stuck a pin", "The carrot", 1),
}


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    for name, text in GLUE_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_glue_tsv_layouts_load(glue_dir, task):
    split, a, b, label = EXPECTED[task]
    examples = load_glue(TASKS[task], split, glue_dir)
    first = examples[0]
    assert first.text_a.startswith(a)
    assert (first.text_b is None) if b is None else first.text_b.startswith(b)
    assert first.label == label
    assert TASKS[task].pair == (b is not None)


def test_a_registered_pair_task_feeds_both_texts_to_the_model():
    """A task registered with a two-column TSV layout (and no hub fields) is fine-tuned on both texts."""
    from transformers import BertTokenizerFast

    from eval.finetune import _glue_tensors
    from eval.glue_data import GlueExample
    from sparsebert.study.corpus_tasks import SPECS

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alpha", "beta"]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    specs = {spec.name: spec for spec in SPECS}
    pair, single = specs["docs_topic"], specs["docs_order"]
    assert pair.pair and not pair.hub_text_fields and not single.pair
    tensors = _glue_tensors(tokenizer, pair, [GlueExample("alpha", "beta", 1)], max_len=8)
    assert tokenizer.decode(tensors["input_ids"][0], skip_special_tokens=True) == "alpha beta"
    assert tensors["token_type_ids"][0].tolist()[:5] == [0, 0, 0, 1, 1]  # [CLS] alpha [SEP] beta [SEP]


def test_glue_multi_row_and_mnli_dev_sets(glue_dir):
    assert [ex.label for ex in load_glue(TASKS["cola"], "train", glue_dir)] == [1, 0]
    assert [ex.label for ex in load_glue(TASKS["stsb"], "train", glue_dir)] == [5.0, 3.8]
    assert load_glue(TASKS["mnli"], "m", glue_dir)[0].label == 1  # gold_label, not label1
    assert load_glue(TASKS["mnli"], "mm", glue_dir)[0].label == 2
    assert len(load_glue(TASKS["cola"], "train", glue_dir, max_samples=1)) == 1


BAD_GLUE = [  # (file, content, line, column, message fragment)
    ("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", 3, 4, "expected 4"),
    ("SST-2/dev.tsv", "sentence\tlabel\ngood film\t2\n", 2, 2, "label '2'"),
    ("STS-B/dev.tsv", GLUE_FILES["STS-B/train.tsv"].replace("3.800", "high"), 3, 10, "score 'high'"),
    (
        "MNLI/dev_matched.tsv",
        GLUE_FILES["MNLI/dev_matched.tsv"].replace("neutral\n", "maybe\n"),
        2,
        16,
        "'maybe'",
    ),
    ("CoLA/dev.tsv", "source\tlabel\tnote\tsentence\ngj04\t1\t\tFine.\n", 1, 2, "label 'label'"),
    ("QQP/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\n", 1, 6, "lacks column 'is_duplicate'"),
    ("QNLI/dev.tsv", "index\tquestion\tsentence\tlabel\n", 2, 1, "no examples"),
]


@pytest.mark.parametrize(("name", "text", "line", "column", "fragment"), BAD_GLUE)
def test_malformed_glue_file_names_file_line_column(tmp_path, name, text, line, column, fragment):
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    task = next(t for t in TASKS.values() if t.dir_name == name.split("/")[0])
    with pytest.raises(DataFormatError) as err:
        read_glue_tsv(task, path)
    assert (err.value.path, err.value.line, err.value.column) == (str(path), line, column)
    assert str(path) in str(err.value) and f"line {line}, column {column}" in str(err.value)
    assert fragment in str(err.value)


def test_format_error_survives_pickling():
    # Ray returns a failed job's exception to the driver pickled.
    err = pickle.loads(
        pickle.dumps(DataFormatError("/x/RTE/dev.tsv", 3, 4, "expected 4 tab-separated columns"))
    )
    assert (err.path, err.line, err.column) == ("/x/RTE/dev.tsv", 3, 4)
    assert str(err) == "/x/RTE/dev.tsv: line 3, column 4: expected 4 tab-separated columns"


def test_missing_glue_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RTE/train\.tsv"):
        load_glue(TASKS["rte"], "train", tmp_path)


def test_glue_hub_rows_map_like_tsv():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict(
        {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, -1], "idx": [0, 1]}
    )
    examples = examples_from_hub_rows(TASKS["mnli"], rows)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("p1", "h1", 2)]  # -1 (test split) dropped
    stsb = examples_from_hub_rows(TASKS["stsb"], [{"sentence1": "a", "sentence2": "b", "label": 3.2}])
    assert stsb[0].label == pytest.approx(3.2)


def _squad_doc(version_2: bool) -> dict:
    qas = [
        {
            "id": "q1",
            "question": "Who wrote it?",
            "answers": [{"text": "Denver Broncos", "answer_start": 4}] * 2,
        },
        {"id": "q2", "question": "Where?", "answers": [{"text": "Santa Clara", "answer_start": 40}]},
    ]
    if version_2:
        qas.append({"id": "q3", "question": "Why?", "answers": [], "is_impossible": True,
                    "plausible_answers": [{"text": "Broncos", "answer_start": 11}]})  # fmt: skip
    context = "The Denver Broncos won Super Bowl 50 in Santa Clara, California."
    return {"version": "v2.0" if version_2 else "1.1", "data": [{"title": "SB", "paragraphs": [{"context": context, "qas": qas}]}]}  # fmt: skip


def test_squad_json_loads_v1_and_v2(tmp_path):
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(_squad_doc(False)))
    (tmp_path / "dev-v2.0.json").write_text(json.dumps(_squad_doc(True)))
    v1 = load_squad(TASKS["squad"], "", tmp_path)
    assert [e.id for e in v1] == ["q1", "q2"]
    assert v1[0].answers == ("Denver Broncos", "Denver Broncos") and v1[0].answer_starts == (4, 4)
    assert v1[1].context[40:51] == "Santa Clara"
    v2 = load_squad(TASKS["squad_v2"], "", tmp_path)
    assert v2[2].is_impossible and v2[2].answers == ()


def _line_of(text: str, fragment: str) -> tuple[int, int]:
    for i, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return i, line.index(fragment) + 1
    raise AssertionError(fragment)


def test_squad_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    path.write_text('{"data": [\n  {"paragraphs": [],}\n]}')
    with pytest.raises(DataFormatError) as err:
        read_squad_json(path, version_2=False)
    assert (err.value.line, err.value.column) == (2, 21) and "invalid JSON" in str(err.value)


def test_squad_structure_errors_point_at_the_object(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    doc = _squad_doc(False)
    del doc["data"][0]["paragraphs"][0]["qas"][1]["id"]
    text = json.dumps(doc, indent=2)
    path.write_text(text)
    with pytest.raises(DataFormatError, match="lacks the key 'id'") as err:
        read_squad_json(path, version_2=False)
    line, _ = _line_of(text, '"question": "Where?"')
    assert err.value.line == line - 1  # the "{" opening that question
    assert str(path) in str(err.value)

    doc = _squad_doc(False)
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 999
    text = json.dumps(doc, indent=2)
    path.write_text(text)
    with pytest.raises(DataFormatError, match="answer_start 999") as err:
        read_squad_json(path, version_2=False)
    assert (err.value.line, err.value.column) == _line_of(text, '"answer_start": 999')


def test_squad_v1_rejects_unanswerable_questions(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    text = json.dumps(_squad_doc(True), indent=2)
    path.write_text(text)
    with pytest.raises(DataFormatError, match=r"need SQuAD v2\.0") as err:
        read_squad_json(path, version_2=False)
    assert (err.value.line, err.value.column) == _line_of(text, '"is_impossible"')
    assert len(read_squad_json(path, version_2=True)) == 3


def test_squad_hub_rows():
    rows = [{"id": "x", "title": "t", "context": "abc def", "question": "q?",
             "answers": {"text": [], "answer_start": []}}]  # fmt: skip
    (ex,) = squad_from_hub_rows(rows)
    assert ex.is_impossible and ex.id == "x"


def test_parse_tasks():
    assert parse_tasks("glue") == list(GLUE_TASKS)
    assert parse_tasks("all") == list(ALL_TASKS)
    assert parse_tasks("cola, SST-2,squad-v2,cola") == ["cola", "sst2", "squad_v2"]
    with pytest.raises(ValueError, match="unknown task 'mnli_m'"):
        parse_tasks("mnli_m")
