"""The one place the evaluation touches the model: load a checkpoint for a task, and describe its mask."""

from __future__ import annotations

import json
from pathlib import Path

from eval.tasks import TASKS, TaskSpec

# The file in which a pre-training export (sparsebert.train.checkpoint) records the MLflow run that produced it.
_RUN_ID_FILE = "mlflow_run_id"


def load_for_task(
    checkpoint: str,
    task: TaskSpec,
    attention_pattern=None,
    attention_backend: str = "auto",
    trust_remote_code: bool = False,
):
    """``SparseBertForSequenceClassification`` / ``ForQuestionAnswering`` from any HF BERT or SparseBERT dir.

    ``attention_pattern=None`` keeps the checkpoint's own mask (a DAM mask is frozen by the fine-tuning classes);
    a name or dict replaces it. The task head is always fresh: ``ignore_mismatched_sizes`` lets a checkpoint
    that already carries a head of another size (e.g. fine-tuned on MNLI) be used. ``trust_remote_code`` lets a
    checkpoint whose mask pattern is a ``"package.module:function"`` path import that code.
    """
    import transformers

    from sparsebert import SparseBertForQuestionAnswering, SparseBertForSequenceClassification

    # The load report lists the new head as "missing": expected here, so only errors are shown.
    transformers.logging.set_verbosity_error()
    kwargs: dict = {"attention_backend": attention_backend, "trust_remote_code": trust_remote_code}
    if attention_pattern is not None:
        kwargs["attention_pattern"] = attention_pattern
    if task.kind == "squad":
        return SparseBertForQuestionAnswering.from_pretrained(checkpoint, **kwargs)
    return SparseBertForSequenceClassification.from_pretrained(
        checkpoint, num_labels=task.num_labels, ignore_mismatched_sizes=True, **kwargs
    )


def mask_sparsity(
    checkpoint: str,
    seq_len: int,
    attention_pattern=None,
    attention_backend: str = "auto",
    trust_remote_code: bool = False,
) -> float:
    """Fraction of masked positions of the mask fine-tuning will use, at ``seq_len`` (all layers and heads)."""
    from sparsebert import sparsity

    # Any sequence-classification task will do: the mask does not depend on the head.
    model = load_for_task(checkpoint, TASKS["sst2"], attention_pattern, attention_backend, trust_remote_code)
    return sparsity(model.current_mask(seq_len))


def _config(checkpoint: str) -> dict:
    path = Path(checkpoint) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def mask_label(checkpoint: str, attention_pattern=None) -> str:
    """A short name for the table's "mask" column: the pattern's name (with λ for DAM masks)."""
    spec = (
        attention_pattern if attention_pattern is not None else _config(checkpoint).get("attention_pattern")
    )
    if spec is None:
        return "dense"
    if isinstance(spec, str):
        return spec
    name = str(spec.get("name", "custom"))
    if isinstance(spec.get("lambda"), (int, float)):
        name += f" λ={spec['lambda']:g}"
    return name + (" no-diag" if spec.get("no_diagonal") else "")


def pretrain_run_id(checkpoint: str) -> str | None:
    """The pre-training MLflow run id a checkpoint records, if any.

    (The runner also asks the MLflow store for a run tagged ``final_model_dir`` = this checkpoint, which is how
    ``sparsebert.pretrain`` marks its export.)
    """
    path = Path(checkpoint) / _RUN_ID_FILE
    run_id = path.read_text().strip() if path.is_file() else ""
    return run_id or None
