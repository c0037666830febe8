"""What an evaluation keeps: every GLUE number of the table recomputed from the saved dev predictions (on disk and
in MLflow); the run each number comes from kept as a Hub-ready model with its card, which a text-classification
pipeline and ``eval.predict`` run on new text; the evaluated export's card gains the results; the best models go
to a (local) Hub. Real MLflow store, real tiny jobs in process, a real HTTP server answering the Hub's API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_server import HubServer
from mlflow import MlflowClient

from eval.glue_data import load_glue
from eval.jobs import DataSource, FinetuneConfig
from eval.options import EvalOptions
from eval.predict import main as predict_main
from eval.predict import read_input, resolve
from eval.publish import KeptModel, best_run, hub_repo
from eval.runner import run_evaluation
from eval.smoke import write_glue, write_tiny_checkpoint
from eval.table import JobRecord, TableRow, row_values, select
from eval.tasks import PREDICTIONS_FILE, TASKS, score_predictions
from sparsebert import SparseBertForPreTraining
from sparsebert.export.card import write_card
from sparsebert.schema import ConfigError

TASK_NAMES = ("sst2", "stsb", "mnli")  # one label, a regression, two dev sets
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation of a standalone export with a card: 3 tasks × 3 seeds, the best models
    uploaded to a local Hub."""
    root = tmp_path_factory.mktemp("models")
    ckpt = write_tiny_checkpoint(root / "star", "star")
    SparseBertForPreTraining.from_pretrained(ckpt).save_pretrained(ckpt, standalone=True)
    write_card(ckpt)
    glue = write_glue(root / "glue", n_train=16, n_dev=10)
    options = EvalOptions(
        checkpoint=(str(ckpt),), tasks=TASK_NAMES, data=DataSource(str(glue)), lrs=(1e-3,), seeds=SEEDS,
        finetune=FinetuneConfig(max_steps=2, batch_size=4, max_seq_len=32), ray=False,
        output=str(root / "out"), tracking_uri=f"sqlite:///{root / 'mlflow.db'}", push_to_hub="lab/tiny",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, HubServer() as hub:
        mp.chdir(root)  # MLflow's artifacts
        mp.setenv("HF_TOKEN", "hf_test")
        mp.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        outcome = run_evaluation(options)
    return outcome, options, ckpt, glue, hub


@pytest.mark.slow
def test_every_glue_number_of_the_table_is_recomputed_from_the_saved_predictions(evaluated):
    _, options, _, _, _ = evaluated
    out = Path(options.output)
    client = MlflowClient(options.tracking_uri)
    records = []
    for path in sorted((out / "jobs").glob("*/*.json")):
        entry = json.loads(path.read_text())
        saved = entry["result"]["artifacts"][PREDICTIONS_FILE]
        metrics = score_predictions(TASKS[entry["task"]], saved)
        assert metrics == pytest.approx(entry["result"]["metrics"], abs=1e-9)
        in_mlflow = client.download_artifacts(entry["mlflow"]["run_id"], PREDICTIONS_FILE, str(path.parent))
        assert json.loads(Path(in_mlflow).read_text()) == saved
        records.append(JobRecord(entry["task"], entry["lr"], entry["seed"], metrics))
    assert len(records) == len(TASK_NAMES) * len(SEEDS)
    (row,) = csv.DictReader((out / "results.csv").open())
    recomputed = row_values(TableRow("", "", None, select(records)))
    columns = ["MNLI-m", "MNLI-mm", "SST-2", "STS-B", "avg"]
    assert {c: float(row[c]) for c in columns} == pytest.approx({c: recomputed[c] for c in columns}, abs=1e-3)


@pytest.mark.slow
def test_the_reported_run_of_each_task_is_kept_with_its_card(evaluated):
    outcome, options, ckpt, _, _ = evaluated
    kept = {m.task: m for m in outcome.kept}
    assert set(kept) == set(TASK_NAMES) and all(m.best for m in kept.values())
    for task, summary in outcome.rows[0].summaries.items():
        model = kept[task]
        assert model.lr == summary.lr and model.seed in summary.seeds
        assert [p.name for p in model.path.parent.iterdir()] == [model.path.name]  # the others are deleted
        card = (model.path / "README.md").read_text()
        record = json.loads((model.path / "finetuning.json").read_text())
        assert record["base_model"] == str(ckpt) and record["task"] == task and record["lr"] == summary.lr
        assert "pipeline_tag: text-classification" in card and "model-index" in card
        for text in ("## Fine-tuning", record["task_label"], f"learning rate {summary.lr:g}", "the median seed",
                     "trust_remote_code=True", "## Citation", "`sparsebert_*.py`"):  # fmt: skip
            assert text in card, text
        assert (model.path / "sparsebert_modeling.py").is_file()
    # the table's number for SST-2 is the median of its seeds, and the kept run is that median
    sst2 = kept["sst2"]
    reported = json.loads((sst2.path / "finetuning.json").read_text())["dev_metrics"]["accuracy"]
    assert reported == pytest.approx(outcome.rows[0].summaries["sst2"].metrics["accuracy"])
    index = list(csv.DictReader((Path(options.output) / "models.csv").open()))
    assert {(r["task"], r["reported"]) for r in index} == {(t, "1") for t in TASK_NAMES}
    # the evaluated export's own card now holds the results
    card = (ckpt / "README.md").read_text()
    assert "## Evaluation" in card and "| SST-2 | accuracy |" in card and "| MNLI-mm |" in card


@pytest.mark.slow
def test_a_kept_model_runs_in_a_pipeline_and_eval_predict_reproduces_its_dev_predictions(
    evaluated, tmp_path, capsys
):
    from transformers import pipeline

    outcome, options, _, glue, _ = evaluated
    kept = {m.task: m for m in outcome.kept}
    classify = pipeline("text-classification", model=str(kept["sst2"].path))
    assert classify("the cat saw a red bird.")[0]["label"] in TASKS["sst2"].labels

    mnli = kept["mnli"]
    dev = load_glue(TASKS["mnli"], "m", glue)
    (tmp_path / "new.tsv").write_text("".join(f"{ex.text_a}\t{ex.text_b}\n" for ex in dev))
    assert (
        predict_main(
            [str(mnli.path), "--input", str(tmp_path / "new.tsv"), "--output", str(tmp_path / "p.tsv")]
        )
        == 0
    )
    predicted = [r["prediction"] for r in csv.DictReader((tmp_path / "p.tsv").open(), delimiter="\t")]
    job = Path(options.output) / "jobs"
    (entry,) = [json.loads(p.read_text()) for p in job.glob(f"*/mnli__lr={mnli.lr:g}__seed={mnli.seed}.json")]
    saved = entry["result"]["artifacts"][PREDICTIONS_FILE]["m"]["predictions"]
    assert predicted == [TASKS["mnli"].labels[i] for i in saved]

    assert predict_main([str(mnli.path), "--task", "sst2", "--input", str(tmp_path / "new.tsv")]) == 2
    assert "was fine-tuned on mnli" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text("one text only\n")
    assert predict_main([str(mnli.path), "--input", str(tmp_path / "bad.tsv")]) == 2
    assert "bad.tsv:1: 1 tab-separated fields, mnli takes 2" in capsys.readouterr().err


@pytest.mark.slow
def test_the_best_models_go_to_the_hub_with_their_files(evaluated):
    outcome, _, _, _, hub = evaluated
    assert not outcome.hub_errors
    assert set(hub.repos) == {"lab/tiny-sst2", "lab/tiny-stsb", "lab/tiny-mnli"}
    model = next(m for m in outcome.kept if m.task == "sst2")
    files = hub.repos["lab/tiny-sst2"].files
    local = {
        p.relative_to(model.path).as_posix(): p.read_bytes() for p in model.path.rglob("*") if p.is_file()
    }
    assert (
        files == local
        and 'from_pretrained("lab/tiny-sst2", trust_remote_code=True)' in files["README.md"].decode()
    )
    assert all(r["authorization"] == "Bearer hf_test" for r in hub.requests if r["method"] == "POST")


def test_push_needs_kept_models_and_a_repo_id():
    with pytest.raises(ConfigError, match="save_models: none"):
        EvalOptions(push_to_hub="lab/x", save_models="none")
    with pytest.raises(ConfigError, match=r"'push_to_hub'.*'org/name'"):
        EvalOptions(push_to_hub="just-a-name")


def test_the_kept_run_is_the_median_seed_at_the_selected_learning_rate():
    runs = [JobRecord("sst2", lr, seed, {"accuracy": acc})
            for lr, seed, acc in [(1e-4, 1, 0.5), (2e-5, 1, 0.7), (2e-5, 2, 0.8), (2e-5, 3, 0.75), (2e-5, 4, 0.6)]]  # fmt: skip
    (summary,) = select(runs).values()
    assert summary.lr == 2e-5 and best_run(runs, summary).seed == 3  # 0.6 0.7 [0.75] 0.8: the upper middle
    assert select(runs[:1])["sst2"].lr == 1e-4 and best_run(runs[:1], select(runs[:1])["sst2"]).seed == 1


def test_hub_repos_of_kept_models():
    model = KeptModel("dam_s λ=0.01", "/c", "squad_v2", 1e-4, 1, True, Path("/m"))
    assert hub_repo("lab/bert", model, several=False) == "lab/bert-squad-v2"
    assert hub_repo("lab/bert", model, several=True) == "lab/bert-dam-s-0.01-squad-v2"


def test_predict_reads_its_task_and_input_or_says_what_is_wrong(tmp_path):
    (tmp_path / "finetuning.json").write_text(json.dumps({"task": "rte", "max_seq_len": 64}))
    assert resolve(str(tmp_path), None, None) == (TASKS["rte"], 64)
    assert resolve(str(tmp_path), "rte", 32) == (TASKS["rte"], 32)
    with pytest.raises(ValueError, match="no task"):
        resolve(str(tmp_path / "elsewhere"), None, None)
    with pytest.raises(ValueError, match="SQuAD: a question-answering pipeline"):
        resolve(str(tmp_path / "elsewhere"), "squad", None)
    (tmp_path / "in.tsv").write_text("a\tb\n\nc\td\n")
    assert read_input(str(tmp_path / "in.tsv"), TASKS["rte"]) == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"in\.tsv:1: 2 tab-separated fields, sst2 takes 1"):
        read_input(str(tmp_path / "in.tsv"), TASKS["sst2"])
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(ValueError, match="holds no example"):
        read_input(str(tmp_path / "empty.tsv"), TASKS["sst2"])


def test_glue_metrics_are_recomputed_from_saved_predictions():
    saved = {
        "m": {"predictions": [0, 1, 2, 2], "labels": [0, 1, 1, 2]},
        "mm": {"predictions": [1], "labels": [1]},
    }
    assert score_predictions(TASKS["mnli"], saved) == {"accuracy_m": 0.75, "accuracy_mm": 1.0}
