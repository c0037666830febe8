"""The study file: the base pre-training, its arms (one pre-training each), how they launch, how their exports are
evaluated. Declared with :mod:`sparsebert.schema` like every other settings file; :func:`load_study` reads a
preset or a YAML file with ``dotted.key=value`` overrides and checks everything (every arm's pre-training config,
the evaluation's options) before anything starts. ``python -m sparsebert.study --help-config`` lists the keys;
docs/study.md explains them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsebert import schema
from sparsebert.schema import ConfigError
from sparsebert.study import corpus_tasks
from sparsebert.train.config import PretrainConfig, load_config

PRESETS_DIR = Path(__file__).parent / "presets"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a directory name on every filesystem and store
# Keys of each arm's pre-training the study sets itself (where it writes, where it is recorded).
STUDY_SET = ("output_dir", "mlflow.experiment", "mlflow.run_name", "mlflow.tracking_uri", "mlflow.enabled")
# Keys of the evaluation the study sets itself.
EVAL_SET = ("checkpoint", "labels", "output", "experiment", "tracking_uri", "parent_run_id", "resume")

_s = schema.setting


@dataclass
class BaseConfig:
    config: str = _s(
        "tiny_cpu", "the base pre-training config: a preset of sparsebert/pretrain.py or a YAML file"
    )
    overrides: dict = _s({}, "its keys set for every arm: dotted (train.max_steps: 100) or as sections")


@dataclass
class LaunchConfig:
    """The deepspeed launcher's flags, the same for every arm."""

    num_gpus: int | None = _s(None, "--num_gpus: ranks per node (null = every GPU; set it on a CPU machine)")
    num_nodes: int | None = _s(None, "--num_nodes: use the first N hosts of the hostfile")
    hostfile: str | None = _s(
        None, "--hostfile: the nodes (one line each: host slots=N); null = this machine"
    )
    include: str | None = _s(None, "--include: hosts and GPUs to use (node-1:0,1@node-2)")
    exclude: str | None = _s(None, "--exclude: hosts and GPUs to leave out")
    master_addr: str | None = _s(None, "--master_addr: rank 0's address every node reaches")
    master_port: int | None = _s(
        None, "--master_port; null = a free port when the run is on this machine alone, else 29500"
    )
    no_ssh: bool = _s(
        False, "--no_ssh: every node runs its own launcher (Slurm, Kubernetes): start the study on each node "
        "with --node-rank N"
    )  # fmt: skip
    node_rank: int | None = _s(None, "--node_rank with no_ssh: this node's index (the --node-rank flag wins)")
    env: dict = _s({}, "environment variables for the launcher and its ranks")


@dataclass
class StudyMlflow:
    experiment: str = _s(
        "sparsebert-study", "the MLflow experiment of the study's run, its arms and evaluation"
    )
    tracking_uri: str | None = _s(
        None, "null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory"
    )


@dataclass
class StudyConfig:
    name: str = _s("study", "the study's name (its MLflow run's name)")
    output_dir: str | None = _s(
        None, "where the study writes (arms/, eval/, results, figures): a directory or s3://, gs://; "
        "null = studies/<name>"
    )  # fmt: skip
    pretrain: BaseConfig = field(default_factory=BaseConfig)
    arms: dict = _s({}, "arm name → its keys on top of the base (dotted or sections); one pre-training each")
    no_diagonal_variants: bool = _s(
        False, "add a twin without the diagonal (<name>_nodiag) after every fixed-pattern arm"
    )
    importance_snapshots: int = _s(
        20, "snapshots of σ(α) per DAM search (sets dam.snapshot_every unless an arm sets it); 0 = none",
        bounds=(0, None),
    )  # fmt: skip
    reference: str | None = _s(
        None, "the arm deltas are taken to; null = the arm named dense, else the first dense one"
    )
    paper: bool = _s(
        False, "show the paper's published GLUE numbers (BERT-base) beside the arms of its patterns"
    )
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: dict = _s(
        {}, "the evaluation's options: python -m eval.run's keys (tasks, lrs, seeds, epochs, ...)"
    )
    mlflow: StudyMlflow = field(default_factory=StudyMlflow)


@dataclass(frozen=True)
class Arm:
    """One arm: its name, its own keys (dotted) and its resolved pre-training config (without the keys the study
    sets when it launches it)."""

    name: str
    overrides: dict[str, Any]
    config: PretrainConfig

    @property
    def learned(self) -> bool:
        spec = self.config.model.mask_spec
        return spec.learned and not spec.params["frozen"]


@dataclass
class Study:
    """A checked study: its settings, its arms in order, and the evaluation's options (without the keys the study
    sets per run)."""

    config: StudyConfig
    source: str
    arms: list[Arm]
    eval_options: dict[str, Any]
    corpus_tasks: list[str] = field(default_factory=list)  # tasks whose data the study writes

    @property
    def output_dir(self) -> str:
        return self.config.output_dir or f"studies/{self.config.name}"

    @property
    def reference(self) -> str | None:
        return reference_arm(self.config.reference, self.arms)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_study(source: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """The study of ``source`` (a preset name or a YAML file) with ``overrides``, every part checked: a bad key
    or value anywhere is a :class:`ConfigError` naming it (and the arm)."""
    data = schema.apply_overrides(schema.read_yaml(_resolve(source)), overrides)
    config = schema.build(StudyConfig, data)
    if not config.arms:
        raise ConfigError("config key 'arms' is empty: name at least one arm (name: {its keys})")
    base = _dotted(config.pretrain.overrides, "pretrain.overrides")
    arms = _with_twins(config, base, [_arm(config, base, name, own) for name, own in _arm_specs(config)])
    options, written = _eval_options(config.eval)
    study = Study(config, source, arms, options, written)
    if config.reference is not None and config.reference not in {a.name for a in arms}:
        raise ConfigError(f"config key 'reference': no arm named {config.reference!r}")
    return study


def describe(study: Study | None = None) -> str:
    return schema.describe(study.config if study else StudyConfig(), study.source if study else None)


def arm_overrides(study: Study, arm: Arm) -> dict[str, Any]:
    """Every key the arm's launch gives on top of the base config: the study's base overrides, the arm's own,
    and the importance snapshots of a DAM search."""
    keys = {**_dotted(study.config.pretrain.overrides, "pretrain.overrides"), **arm.overrides}
    every = snapshot_every(study, arm)
    if every:
        keys.setdefault("dam.snapshot_every", every)
    return keys


def snapshot_every(study: Study, arm: Arm) -> int:
    """Steps between σ(α) snapshots of a DAM arm: the arm's own ``dam.snapshot_every``, else the search split
    into ``importance_snapshots`` parts (0 for fixed patterns)."""
    if not arm.learned:
        return 0
    if arm.config.dam.snapshot_every:
        return arm.config.dam.snapshot_every
    count = study.config.importance_snapshots
    return max(1, arm.config.search_steps // count) if count else 0


def identity(config: PretrainConfig) -> dict[str, Any]:
    """The keys that decide what an arm's pre-training computes, dotted: every key that is not neutral (the
    schema's: where output goes, logging, checkpoint cadence), plus ``train.max_steps``."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif not f.metadata.get("neutral") or f"{prefix}{f.name}" == "train.max_steps":
                out[f"{prefix}{f.name}"] = value

    walk(config, "")
    return out


def reference_arm(name: str | None, arms: list[Arm]) -> str | None:
    """The arm deltas are taken to: ``name``, else the arm named ``dense``, else the first with a dense mask."""
    if name is not None:
        return name
    names = [a.name for a in arms]
    if "dense" in names:
        return "dense"
    return next((a.name for a in arms if a.config.model.mask_spec.name == "dense"), None)


# --- internals -------------------------------------------------------------------------------------------


def _resolve(source: str) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{source}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"study {source!r} not found: no such file, and no preset of that name ({', '.join(presets())})"
    )


def _arm_specs(config: StudyConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, own keys) of every arm, as the study file lists them."""
    specs = []
    for name, own in config.arms.items():
        name = str(name)
        if not ARM_NAME.match(name):
            raise ConfigError(
                f"config key 'arms': arm name {name!r} must be letters, digits and _ . + - only"
            )
        if own is None:
            own = {}
        if not isinstance(own, dict):
            raise ConfigError(f"config key 'arms.{name}' must be a mapping of pre-training keys, got {own!r}")
        specs.append((name, _dotted(own, f"arms.{name}")))
    return specs


def _with_twins(config: StudyConfig, base: dict[str, Any], arms: list[Arm]) -> list[Arm]:
    """The arms, each fixed pattern followed by its twin without the diagonal (``<name>_nodiag``): a learned
    mask decides about its diagonal itself, and an arm already without it has no twin."""
    out = []
    for arm in arms:
        out.append(arm)
        spec = arm.config.model.mask_spec
        if config.no_diagonal_variants and not (
            spec.learned or spec.name == "no_diagonal" or spec.params.get("no_diagonal")
        ):
            pattern = arm.config.model.attention_pattern
            pattern = {**({"name": pattern} if isinstance(pattern, str) else pattern), "no_diagonal": True}
            own = {**arm.overrides, "model.attention_pattern": pattern}
            out.append(_arm(config, base, f"{arm.name}_nodiag", own))
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        twin = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"config key 'arms': two arms are named {twin!r}")
    return out


def _arm(config: StudyConfig, base: dict[str, Any], name: str, own: dict[str, Any]) -> Arm:
    for key in own:
        if key in STUDY_SET:
            raise ConfigError(f"config key 'arms.{name}.{key}' is set by the study; leave it out")
    for key in base:
        if key in STUDY_SET:
            raise ConfigError(f"config key 'pretrain.overrides.{key}' is set by the study; leave it out")
    try:
        config_ = load_config(config.pretrain.config, _as_overrides({**base, **own}))
    except ConfigError as err:
        raise ConfigError(f"arm {name!r}: {err}") from None
    return Arm(name, own, config_)


def _eval_options(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The evaluation's options (checked now: a bad key is an error before any pre-training), and the corpus
    tasks among its tasks (the study writes their data)."""
    from eval.options import EvalOptions

    given = [key for key in EVAL_SET if key in data]
    if given:
        raise ConfigError(f"config key 'eval.{given[0]}' is set by the study; leave it out")
    options = schema.build(EvalOptions, {**data, "checkpoint": ["<arm>/final"]}, "eval.")
    written = [name for name in options.task_names if name in corpus_tasks.TASK_DIRS]
    if written and (options.data.glue_dir or options.data.hub):
        raise ConfigError(
            f"config key 'eval.tasks': {', '.join(written)} are written by the study into its own directory; "
            "evaluate them in a study without eval.glue_dir and eval.hub"
        )
    if written and len(written) != len(options.task_names):
        other = next(t for t in options.task_names if t not in written)
        raise ConfigError(
            f"config key 'eval.tasks': {other} cannot be mixed with the corpus tasks {', '.join(written)}"
        )
    return dict(data), written


@functools.cache
def _sections() -> frozenset[str]:
    """The sections of the pre-training config (model, data, train, ...)."""
    hints = typing.get_type_hints(PretrainConfig)
    return frozenset(
        f.name for f in dataclasses.fields(PretrainConfig) if dataclasses.is_dataclass(hints[f.name])
    )


def _dotted(keys: dict[str, Any], where: str) -> dict[str, Any]:
    """``keys`` with every section of the pre-training config (``train: {lr: ...}``) spelt as dotted keys; a
    value that is a mapping elsewhere (an attention pattern) stays one."""
    if not isinstance(keys, dict):
        raise ConfigError(f"config key {where!r} must be a mapping of pre-training keys, got {keys!r}")
    out: dict[str, Any] = {}
    for key, value in keys.items():
        key = str(key)
        if key in _sections() and isinstance(value, dict):
            out.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            out[key] = value
    return out


def _as_overrides(keys: dict[str, Any]) -> list[str]:
    """``dotted.key=value`` words, the value in YAML (what ``load_config`` and the command line read)."""
    return [f"{key}={yaml_value(value)}" for key, value in keys.items()]


def yaml_value(value: Any) -> str:
    """A value as one line of YAML (flow style): ``{name: dam_s, lambda: 0.0001}``, ``[1, 2]``, ``null``."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
