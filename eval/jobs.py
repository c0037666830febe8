"""What one fine-tuning job is (checkpoint × task × learning rate × seed) and how an evaluation expands into jobs.

Kept free of torch so the driver can plan, resume and report without loading a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsebert import choices, schema

DEVICES = ("auto", "cuda", "cpu")
# Where a job runs, not what it computes: left out of the evaluation key (so --resume can finish an evaluation
# on another kind of machine) and of the parent run's params (which MLflow never lets change on resume).
RUNTIME_FIELDS = ("device", "trust_remote_code")

# A setting of the evaluation (eval.options.EvalOptions reads these sections' keys at its own level): a flag of
# ``python -m eval.run`` too.
_hp = functools.partial(schema.setting, cli=True, group="fine-tuning")
_smoke = functools.partial(schema.setting, cli=True, group="smoke runs", bounds=(1, None), metavar="N")
_data = functools.partial(schema.setting, cli=True, group="data")


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters shared by every job of an evaluation (BERT's recipe by default)."""

    epochs: float = _hp(3.0, "training epochs of each job", bounds=(0, None))
    batch_size: int = _hp(32, "training batch size", bounds=(1, None))
    max_seq_len: int = _hp(128, "GLUE sequence length (the paper's table is at 128)", bounds=(8, None))
    squad_max_seq_len: int = _hp(384, "SQuAD window length, question included", bounds=(8, None))
    doc_stride: int = _hp(128, "SQuAD: tokens shared by consecutive windows of a context", bounds=(1, None))
    max_query_len: int = _hp(64, "SQuAD: questions are cut to this many tokens", bounds=(1, None))
    warmup_ratio: float = _hp(0.1, "share of the steps the learning rate warms up over", bounds=(0, 1))
    weight_decay: float = _hp(0.01, "AdamW weight decay (not on biases and LayerNorm)", bounds=(0, None))
    eval_batch_size: int = _hp(128, "batch size of the dev predictions", bounds=(1, None))
    n_best: int = _hp(20, "SQuAD: start and end positions tried per window", bounds=(1, None))
    max_answer_len: int = _hp(30, "SQuAD: longest answer, in tokens", bounds=(1, None))
    null_threshold: float = _hp(
        0.0, "SQuAD v2.0: predict no answer when its score beats the best span's by more than this"
    )
    max_steps: int | None = _smoke(None, "stop each job after this many optimizer steps")
    max_train_samples: int | None = _smoke(None, "train on the first N examples of each task only")
    max_eval_samples: int | None = _smoke(None, "score the first N dev examples of each task only")
    attention_pattern: str | dict | None = _hp(
        None,
        "replace the checkpoint's mask: a pattern name or spec ({name: longformer, window: 4}; JSON on the "
        "command line); null = the checkpoint's own mask (a DAM mask frozen)",
        metavar="NAME|JSON",
    )
    attention_backend: str = _hp(
        "auto",
        "attention implementation; auto picks per mask and device",
        choices=choices.ATTENTION_BACKENDS,  # registered backends join this list
        metavar="NAME",
    )
    bf16: bool = _hp(False, "bfloat16 autocast on GPU")
    device: str = _hp(
        "auto",
        "auto: the GPU if torch sees one (on Ray: always, when jobs get GPUs), else the CPU; cuda: fail rather "
        "than run on the CPU; cpu: never use a GPU",
        choices=DEVICES,
    )
    trust_remote_code: bool = _hp(
        False,
        "trust the checkpoint to run code it brings (transformers' flag, docs/security.md): a mask pattern its "
        "config names as 'package.module:function'",
    )

    def __post_init__(self) -> None:
        schema.validate(self)


def recipe(config: FinetuneConfig) -> dict[str, Any]:
    """The hyper-parameters that decide a job's result: the config without its runtime fields."""
    return {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}


@dataclass(frozen=True)
class DataSource:
    """Where task data comes from: local official files, or the Hugging Face hub when ``hub``."""

    glue_dir: str | None = _data(
        None,
        "GLUE distribution dir (CoLA/, SST-2/, MNLI/, ... with train/dev TSVs)",
        convert=schema.paths,
        metavar="DIR",
    )
    squad_dir: str | None = _data(
        None,
        "dir with train-v1.1.json, dev-v1.1.json, train-v2.0.json, dev-v2.0.json",
        convert=schema.paths,
        metavar="DIR",
    )
    hub: bool = _data(
        False, "download nyu-mll/glue, rajpurkar/squad, rajpurkar/squad_v2 instead of local files"
    )

    def __post_init__(self) -> None:
        schema.validate(self)


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: ``checkpoint`` fine-tuned on ``task`` at one learning rate and seed."""

    checkpoint: str
    task: str
    lr: float
    seed: int
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataSource = field(default_factory=DataSource)
    # Where the job writes its fine-tuned model (eval.publish.save_model); None: it keeps nothing. Not part of
    # the evaluation key: keeping a model does not change its result.
    save_to: str | None = None

    @property
    def key(self) -> str:
        """Identifies the job inside its evaluation (recorded as an MLflow tag, used by ``--resume``)."""
        return f"{self.task}/lr={self.lr:g}/seed={self.seed}"


def resolve_checkpoint(checkpoint: str) -> str:
    """An absolute path for a local directory (so records compare across working dirs); hub ids unchanged."""
    return str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else checkpoint


def evaluation_key(checkpoint: str, config: FinetuneConfig, data: DataSource) -> str:
    """A digest of everything that changes a job's result except task, learning rate and seed.

    ``--resume`` only reuses jobs recorded under the same key, so changing e.g. ``--epochs`` starts afresh.
    """
    payload = {"checkpoint": resolve_checkpoint(checkpoint), "config": recipe(config), "data": asdict(data)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand_jobs(
    checkpoints: list[str],
    tasks: list[str],
    lrs: list[float],
    seeds: list[int],
    config: FinetuneConfig,
    data: DataSource,
) -> list[Job]:
    """Every checkpoint × task × learning rate × seed, in that order."""
    return [
        Job(resolve_checkpoint(c), t, lr, s, config, data)
        for c in checkpoints
        for t in tasks
        for lr in lrs
        for s in seeds
    ]


def job_params(job: Job) -> dict[str, Any]:
    """The job's MLflow params: its own coordinates plus the shared hyper-parameters."""
    params = {"task": job.task, "lr": job.lr, "seed": job.seed, "checkpoint": job.checkpoint}
    params.update({k: v for k, v in asdict(job.config).items() if v is not None})
    params.update({f"data.{k}": v for k, v in asdict(job.data).items() if v not in (None, False)})
    return params
