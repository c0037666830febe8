"""The model card of an export folder, written from the folder alone (config, weights, the records writers leave),
and the Hub repo ids the uploads accept. Fast: a tiny DAM export in process; the cards of a real pre-training run
and of kept fine-tuned models are tests/test_export_pretraining.py's and tests/test_eval_models.py's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from eval.smoke import write_tiny_checkpoint
from sparsebert import SparseBertForPreTraining
from sparsebert.export.card import CITATION, EVAL_FILE, RUN_FILE, write_card
from sparsebert.export.hub import check_repo_id

RUN = {
    "steps": 20, "search_steps": 8, "sequence_length": 16, "global_batch": 4, "tokens": 1280,
    "held_out": {"val/mlm_loss": 3.25, "val/mlm_accuracy": 0.125},
    "held_out_start": {"val/mlm_loss": 4.5, "val/mlm_accuracy": 0.0},
    "data": {"description": "data/pydocs", "manifest": {
        "sources": [{"type": "huggingface", "name": "wikitext", "config": "wikitext-2-raw-v1"}],
        "counts": {"documents": 30, "samples": 90, "tokens": 1440}, "seq_len": 16,
        "tokenizer": {"source": "trained wordpiece", "vocab_size": 80}, "validation": {"counts": {"documents": 3}},
    }},
    "mlflow_run_id": "abc123", "mlflow_experiment": "sparsebert-pretrain",
    "config": {"train": {"optimizer": "adamw", "lr": 0.001, "warmup_steps": 2, "decay": "linear", "seed": 1}},
}  # fmt: skip
EVAL = {
    "selection": "median over seeds at the best learning rate per task",
    "rows": [{"column": "SST-2", "metric": "accuracy", "value": 81.25, "lr": 2e-5, "seeds": [1, 2, 3],
              "task_type": "text-classification", "dataset": "nyu-mll/glue", "dataset_name": "GLUE SST-2",
              "config": "sst2", "split": "validation"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("card") / "dam", {"name": "dam_s", "lambda": 0.01})
    model = SparseBertForPreTraining.from_pretrained(folder)
    model.train()
    ids = torch.randint(5, 60, (2, 16))
    model(ids, labels=ids).loss.backward()  # one search pass at 16 records the searched length
    model.freeze_mask()
    model.save_pretrained(folder, standalone=True)
    (folder / RUN_FILE).write_text(json.dumps(RUN))
    return folder


def test_the_card_of_a_pretrained_export_says_what_it_is(export):
    card = write_card(export, model_id="lab/tiny-dam").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["pipeline_tag"] == "fill-mask" and meta["datasets"] == ["wikitext"]
    assert {"sparsebert", "dam-s", "custom_code"} <= set(meta["tags"])
    for text in (
        "# tiny-dam: a sparse-attention BERT (dam_s)", "`lambda` = 0.01", "| shared by all 2 layers |", "searched at sequence length 16",
        "steps: 20 (8 of them searching the mask), global batch 4 sequences of 16 tokens: 1,280 token positions",
        "(`wikitext` (wikitext-2-raw-v1)): 30 documents", "3 documents held out",
        "held-out MLM loss 3.250, accuracy 12.5% (from 4.500, 0.0%)", "MLflow run `abc123`",
        'AutoModelForMaskedLM.from_pretrained("lab/tiny-dam", trust_remote_code=True)', CITATION,
    ):  # fmt: skip
        assert text in body, text
    assert "## Evaluation" not in body
    pictures = [line[line.index("(") + 1 : -1] for line in body.splitlines() if line.startswith("![")]
    assert "figures/importance_by_distance.png" in pictures and all((export / p).is_file() for p in pictures)


def test_evaluation_results_join_the_card_and_its_model_index(export):
    (export / EVAL_FILE).write_text(json.dumps(EVAL))
    try:
        card = write_card(export).read_text()
    finally:
        (export / EVAL_FILE).unlink()
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "nyu-mll/glue" and result["metrics"][0]["value"] == 81.25
    assert "| SST-2 | accuracy | 81.2 | 2e-05 | 1, 2, 3 |" in card
    assert f'from_pretrained("{export}", trust_remote_code=True)' in card  # no repo yet: the folder


def test_a_corrupt_record_is_an_error_naming_it(export, tmp_path):
    (export / EVAL_FILE).write_text("{not json")
    try:
        with pytest.raises(ValueError, match=r"evaluation\.json is not valid JSON"):
            write_card(export)
    finally:
        (export / EVAL_FILE).unlink()


@pytest.mark.parametrize("repo", ["org/name", "a-b/c.d_e"])
def test_hub_repo_ids_read_org_slash_name(repo):
    assert check_repo_id(repo) == repo


@pytest.mark.parametrize("repo", ["name", "org/name/x", "/name", "org/..", "org/na me", ""])
def test_anything_else_is_refused_naming_the_setting(repo):
    with pytest.raises(ValueError, match=r"export\.push_to_hub' must be a Hub repo id 'org/name'"):
        check_repo_id(repo, "config key 'export.push_to_hub'")
