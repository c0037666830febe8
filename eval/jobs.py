"""What one fine-tuning job is (checkpoint × task × learning rate × seed) and how an evaluation expands into jobs.

Kept free of torch so the driver can plan, resume and report without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cuda", "cpu")
# Where a job runs, not what it computes: left out of the evaluation key (so --resume can finish an evaluation
# on another kind of machine) and of the parent run's params (which MLflow never lets change on resume).
RUNTIME_FIELDS = ("device", "trust_remote_code")


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters shared by every job of an evaluation (BERT's recipe by default)."""

    epochs: float = 3.0
    batch_size: int = 32
    max_seq_len: int = 128  # GLUE; the paper's table is at 128
    squad_max_seq_len: int = 384
    doc_stride: int = 128  # tokens shared by consecutive SQuAD windows
    max_query_len: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_batch_size: int = 128
    n_best: int = 20
    max_answer_len: int = 30
    null_threshold: float = 0.0  # SQuAD v2.0: predict "" when null beats the best span by more than this
    max_steps: int | None = None  # smoke runs: stop after this many optimizer steps
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    attention_pattern: str | dict | None = None  # None: the checkpoint's own (frozen) mask
    attention_backend: str = "auto"
    bf16: bool = False  # autocast to bfloat16 on GPU
    device: str = "auto"  # "auto": CUDA if torch sees a GPU, else CPU; "cuda": a GPU is required; "cpu"
    trust_remote_code: bool = False  # a checkpoint whose mask pattern is "pkg.module:fn" may import it

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")


def recipe(config: FinetuneConfig) -> dict[str, Any]:
    """The hyper-parameters that decide a job's result: the config without its runtime fields."""
    return {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}


@dataclass(frozen=True)
class DataSource:
    """Where task data comes from: local official files, or the Hugging Face hub when ``hub``."""

    glue_dir: str | None = None
    squad_dir: str | None = None
    hub: bool = False


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: ``checkpoint`` fine-tuned on ``task`` at one learning rate and seed."""

    checkpoint: str
    task: str
    lr: float
    seed: int
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataSource = field(default_factory=DataSource)

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
