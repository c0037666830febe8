"""What a study has left to do, read from its ``output_dir``: each arm finished (its ``final/`` is complete and it
is the arm the study file describes), to resume (a checkpoint is there), to run, or changed (the study file now
says something else: refused, naming the keys, unless changes are allowed, when the arm runs again in a new
directory and the old one is kept); then the evaluation's job count. Nothing here starts anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sparsebert import schema
from sparsebert.schema import ConfigError
from sparsebert.study import launch
from sparsebert.study.config import Arm, Study, arm_overrides, identity, yaml_value
from sparsebert.study.place import StudyPlace
from sparsebert.train.config import PretrainConfig

FINISHED, RESUME, NEW, CHANGED = "finished", "resume", "run", "changed"


@dataclass
class ArmPlan:
    arm: Arm
    dirname: str  # arms/<dirname> in output_dir
    status: str  # FINISHED, RESUME, NEW or CHANGED
    output_dir: str  # the pre-training's output_dir
    changed: list[str] = field(default_factory=list)  # keys that differ from what the arm was
    replaces: str | None = None  # a changed arm, allowed: the directory it leaves behind

    def overrides(self, study: Study) -> list[str]:
        """The launch's ``key=value`` words: the arm's keys on the base config, then the study's own."""
        keys = arm_overrides(study, self.arm)
        keys.update({
            "output_dir": self.output_dir,
            "mlflow.enabled": True,
            "mlflow.experiment": study.config.mlflow.experiment,
            "mlflow.run_name": f"{study.config.name}/{self.arm.name}",
        })  # fmt: skip
        if study.config.mlflow.tracking_uri:
            keys["mlflow.tracking_uri"] = study.config.mlflow.tracking_uri
        return [f"{key}={yaml_value(value)}" for key, value in keys.items()]

    def command(self, study: Study, node_rank: int | None, dry_run: bool = False) -> list[str]:
        port = launch.master_port(study.config.launch, dry_run)
        return [
            *launch.launcher_words(study.config.launch, node_rank, port),
            *launch.pretrain_words(study.config.pretrain.config, self.overrides(study)),
        ]


@dataclass
class Plan:
    study: Study
    arms: list[ArmPlan]
    jobs: int  # the evaluation's jobs

    @property
    def refused(self) -> list[ArmPlan]:
        return [a for a in self.arms if a.status == CHANGED]

    def check(self) -> None:
        """A changed arm, not allowed: a :class:`ConfigError` naming it and its keys."""
        if self.refused:
            arm = self.refused[0]
            raise ConfigError(
                f"arm {arm.arm.name!r} in {arm.output_dir} was run with other values of {', '.join(arm.changed)}; "
                "restore them, or rerun with --allow-changes (the arm runs again in a new directory, the old one "
                "is kept)"
            )


def make_plan(study: Study, place: StudyPlace, state: dict[str, Any], allow_changes: bool) -> Plan:
    records = state.get("arms", {})
    arms = [_arm_plan(arm, place, records.get(arm.name), allow_changes) for arm in study.arms]
    options = study.eval_options
    from eval.options import EvalOptions

    checked = schema.build(EvalOptions, {**options, "checkpoint": [a.dirname for a in arms]})
    jobs = len(arms) * len(checked.task_names) * len(checked.lrs) * len(checked.seeds)
    return Plan(study, arms, jobs)


def arm_record(plan: ArmPlan, status: str) -> dict[str, Any]:
    """What ``study.json`` keeps of an arm."""
    return {"dir": plan.dirname, "status": status, "identity": plain(identity(plan.arm.config))}


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists), so a recorded arm compares equal to a planned one."""
    return json.loads(json.dumps(value, default=str))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(key for key in {*old, *new} if old.get(key) != new.get(key))


def _arm_plan(arm: Arm, place: StudyPlace, record: dict[str, Any] | None, allow: bool) -> ArmPlan:
    dirname = record["dir"] if record else arm.name
    planned = plain(identity(arm.config))
    before = record["identity"] if record else _saved_identity(place, dirname)
    changed = differences(before, planned) if before is not None else []
    if changed and allow:
        new = _next_dir(place, arm.name, dirname)
        return ArmPlan(arm, new, NEW, place.arm_dir(new), changed, replaces=dirname)
    if changed:
        status = CHANGED
    elif place.finished(dirname):
        status = FINISHED
    else:
        status = RESUME if place.started(dirname) else NEW
    return ArmPlan(arm, dirname, status, place.arm_dir(dirname), changed)


def _saved_identity(place: StudyPlace, dirname: str) -> dict[str, Any] | None:
    """What an arm directory the state does not know (a lost ``study.json``) was trained as, from its newest
    checkpoint."""
    saved = place.saved_config(dirname)
    if saved is None:
        return None
    try:
        return plain(identity(schema.build(PretrainConfig, saved)))
    except ConfigError:
        return {}  # a config of another version of the schema: every key counts as changed


def _next_dir(place: StudyPlace, name: str, current: str) -> str:
    """The next free directory of an arm that changed: ``<name>.v2``, ``<name>.v3``, ..."""
    version = 2
    while f"{name}.v{version}" == current or place.started(f"{name}.v{version}"):
        version += 1
    return f"{name}.v{version}"
