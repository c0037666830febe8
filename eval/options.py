"""``EvalOptions``: every setting of an evaluation, declared once. The command line (``python -m eval.run``), a
YAML file (``--config``, or :meth:`EvalOptions.from_dict`) and Python callers (:func:`eval.runner.run_evaluation`)
read the same fields.

A key is its flag's name (``--batch-size`` is ``batch_size``); lists are YAML lists (``tasks: [all]``,
``lrs: [2e-5, 3e-5]``, ``seeds: [1, 2]``) or comma lists on the command line (``--lrs 2e-5,3e-5``). The
fine-tuning recipe (:class:`eval.jobs.FinetuneConfig`) and the data source (:class:`eval.jobs.DataSource`) are
sections whose keys sit at the top level (``epochs``, ``glue_dir``). ``python -m eval.run --help-config`` lists
them all. Imports no torch, Ray or MLflow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from eval.jobs import DataSource, FinetuneConfig
from eval.tasks import TASKS, parse_tasks
from sparsebert import schema
from sparsebert.export.hub import check_repo_id
from sparsebert.schema import ConfigError

_opt = functools.partial(schema.setting, cli=True)
_run = functools.partial(schema.setting, cli=True, group="orchestration and records")
# Settings of the Ray executor only: with ray false they would be silently ignored.
_RAY_ONLY = ("ray_address", "cpus_per_job", "gpus_per_job")
SAVE_MODELS = ("best", "all", "none")


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Which checkpoints to fine-tune on which tasks, at which learning rates and seeds; with what recipe and data;
    how the jobs run and where their records go."""

    checkpoint: tuple[str, ...] = _opt(
        (),
        "model dirs (our final/ exports or any HF BERT dir) or hub ids; one table row each",
        convert=schema.paths,
        metavar="DIR",
    )
    labels: tuple[str, ...] | None = _opt(
        None, "row names, one per checkpoint; null = the mask's name", sep=",", metavar="NAME,..."
    )
    tasks: tuple[str, ...] = _opt(
        ("glue",),
        f"glue (8 tasks), all (+ SQuAD v1.1, v2.0) or task names: {', '.join(TASKS)}",
        sep=",",
        metavar="TASK,...",
    )
    data: DataSource = schema.section(DataSource, flat=True)
    lrs: tuple[float, ...] = _opt(
        (2e-5, 3e-5, 5e-5), "learning rates", sep=",", bounds=(0, None), group="fine-tuning", metavar="LR,..."
    )
    seeds: tuple[int, ...] = _opt((1, 2, 3, 4, 5), "seeds", sep=",", group="fine-tuning", metavar="SEED,...")
    finetune: FinetuneConfig = schema.section(FinetuneConfig, flat=True)
    ray: bool = _run(
        True,
        "run the jobs as Ray tasks; --no-ray: one after another in this process (no Ray needed), same records",
    )
    ray_address: str | None = _run(
        None, "join this Ray cluster ('auto' on a cluster node); null = a local Ray", metavar="ADDR"
    )
    max_retries: int = _run(1, "reruns of a failed job", bounds=(0, None), metavar="N")
    cpus_per_job: float = _run(1.0, "Ray CPUs per job", bounds=(0, None), metavar="N")
    gpus_per_job: float | None = _run(
        None, "Ray GPUs per job; null = 1 if the cluster has GPUs (and device is not cpu), else 0",
        bounds=(0, None), metavar="N",
    )  # fmt: skip
    resume: bool = _run(False, "skip jobs already finished and recorded (in MLflow, or in output/jobs/)")
    experiment: str = _run("sparsebert-eval", "MLflow experiment")
    tracking_uri: str | None = _run(
        None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here", metavar="URI"
    )
    parent_run_id: str | None = _run(
        None,
        "nest each checkpoint's parent run under this MLflow run (a study's); null = none",
        metavar="RUN_ID",
    )
    output: str = _run(
        "eval_results",
        "where results.md, results.csv, selection.csv, jobs/ and models/ go",
        convert=schema.paths,
        metavar="DIR",
    )
    save_models: str = _run(
        "best",
        "fine-tuned models kept in output/models/, Hub-ready with a model card: best (per checkpoint and task, "
        "the run whose dev score the table reports), all, or none",
        choices=SAVE_MODELS,
    )
    push_to_hub: str | None = _run(
        None,
        "upload each best fine-tuned model to the Hugging Face Hub as ORG/NAME-<task> (several checkpoints: "
        "ORG/NAME-<mask>-<task>); the token from HF_TOKEN or `hf auth login`",
        metavar="ORG/NAME",
    )

    def __post_init__(self) -> None:
        schema.validate(self)
        for key in ("tasks", "lrs", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"config key {key!r} (--{key}) is empty: name at least one")
        _ = self.task_names  # an unknown task: an error naming the key now, not when the jobs start
        if self.labels is not None and self.checkpoint and len(self.labels) != len(self.checkpoint):
            raise ConfigError(
                f"config key 'labels' (--labels) gives {len(self.labels)} labels for {len(self.checkpoint)} "
                "checkpoints: give one per checkpoint"
            )
        if self.push_to_hub is not None:
            try:
                check_repo_id(self.push_to_hub, "config key 'push_to_hub' (--push-to-hub)")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if self.save_models == "none":
                raise ConfigError(
                    "config key 'push_to_hub' (--push-to-hub) uploads kept models: not with save_models: none"
                )
        if not self.ray and (given := [k for k in _RAY_ONLY if getattr(self, k) != _default(k)]):
            keys = ", ".join(f"{k!r} (--{k.replace('_', '-')})" for k in given)
            raise ConfigError(
                f"config key{'s' if len(given) > 1 else ''} {keys} only for Ray: not allowed with --no-ray "
                "(ray: false)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalOptions:
        """Options from a mapping of these keys (a YAML file's): unknown keys and bad values are a
        :class:`~sparsebert.schema.ConfigError` naming the key."""
        return schema.build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """The options as :meth:`from_dict` (and a YAML file) takes them: ``from_dict(o.to_dict()) == o``."""
        return schema.to_dict(self)

    @property
    def task_names(self) -> list[str]:
        """The registered tasks ``tasks`` names (``glue`` and ``all`` expanded, aliases resolved)."""
        try:
            return parse_tasks(",".join(self.tasks))
        except ValueError as err:
            raise ConfigError(f"config key 'tasks' (--tasks): {err}") from None

    def check_runnable(self) -> None:
        """What a run needs besides valid values: a checkpoint, and the data of every task named (or the hub)."""
        if not self.checkpoint:
            raise ConfigError(
                "config key 'checkpoint' (--checkpoint) is empty: name the model dirs to evaluate"
            )
        if self.data.hub:
            return
        missing: dict[str, list[str]] = {}
        for name in self.task_names:
            key = "glue_dir" if TASKS[name].kind == "glue" else "squad_dir"
            if getattr(self.data, key) is None:
                missing.setdefault(key, []).append(name)
        if missing:
            key, names = next(iter(missing.items()))
            raise ConfigError(
                f"config key {key!r} (--{key.replace('_', '-')}) is needed by {', '.join(names)}: give it, or "
                "hub: true (--hub) to download the tasks"
            )


@functools.cache
def _default(key: str) -> Any:
    return schema.default_of(EvalOptions.__dataclass_fields__[key])
