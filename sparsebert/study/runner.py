"""A study, start to end: :func:`run_study` = the plan (:mod:`.plan`: what is finished, what resumes, what is
refused) → each arm's pre-training under the ``deepspeed`` launcher, one after another → every export fine-tuned in
one evaluation (``eval.runner.run_evaluation``: Ray, or in this process) → the table and the figures, all under one
MLflow run.

Every step leaves its mark in ``output_dir`` before the next begins (``study.json``; an arm's ``final/``; the
evaluation's finished jobs), so the same command after an interruption continues where it stopped, and on a
finished study does nothing but print the results. With ``launch.no_ssh`` every node runs the study (``--node-rank
N``): each launches its share of every arm; node 0 alone writes the state, evaluates and reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import yaml

from sparsebert import schema
from sparsebert.study import launch
from sparsebert.study.config import Study, yaml_value
from sparsebert.study.place import StudyPlace
from sparsebert.study.plan import FINISHED, NEW, RESUME, ArmPlan, Plan, arm_record, make_plan
from sparsebert.study.tracking import StudyRun
from sparsebert.train.config import PARENT_RUN_ENV

# The evaluation's settings that say where and how its jobs run, not what they compute.
RUNTIME = ("ray", "ray_address", "cpus_per_job", "gpus_per_job", "max_retries", "parent_run_id")


class StudyStopped(Exception):
    """An arm stopped before it finished (a signal, a failure): the state says so, the message says what next."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def prepare(study: Study, node_rank: int | None, allow_changes: bool) -> tuple[Plan, StudyPlace, int | None]:
    """The plan, checked (a refused arm, a bad launch block, missing evaluation data: a ConfigError, before
    anything starts)."""
    rank = launch.check_launch(study.config.launch, node_rank)
    place = StudyPlace(study.output_dir)
    plan = make_plan(study, place, place.read_state(), allow_changes)
    plan.check()
    return plan, place, rank


def check_eval_data(study: Study) -> None:
    """The evaluation's data, checked before the first pre-training (the corpus tasks the study writes itself)."""
    if study.corpus_tasks:
        return
    from eval.inputs import check_inputs
    from eval.options import EvalOptions

    options = schema.build(EvalOptions, {**study.eval_options, "checkpoint": ["<arms>"]})
    options.check_runnable()
    check_inputs([], options.task_names, options.data)


def describe_plan(plan: Plan, place: StudyPlace, rank: int | None, dry_run: bool) -> str:
    study = plan.study
    counts = {s: sum(a.status == s for a in plan.arms) for s in (FINISHED, RESUME, NEW)}
    node = f" (node {rank})" if rank is not None else ""
    lines = [
        f"study {study.config.name}{node}: {len(plan.arms)} arms in {place.location.uri}: {counts[FINISHED]} finished, "
        f"{counts[RESUME]} to resume, {counts[NEW]} to run"
    ]
    for arm in plan.arms:
        keys = " ".join(f"{k}={yaml_value(v)}" for k, v in arm.arm.overrides.items()) or "(the base config)"
        note = f" (changed: {', '.join(arm.changed)}; {arm.replaces} is kept)" if arm.replaces else ""
        lines.append(f"  {arm.arm.name:<18} {arm.status:<9} {keys}{note}")
        if arm.status != FINISHED and (dry_run or rank is not None):
            lines.append(f"    {launch.show(arm.command(study, rank, dry_run=True))}")
    options = _options(study, place, plan, run_id=None, ray=True, local=False)
    per_arm = plan.jobs // len(plan.arms)
    lines.append(
        f"eval: {len(plan.arms)} checkpoints × {len(options.task_names)} tasks ({', '.join(options.task_names)}) × "
        f"{len(options.lrs)} learning rates × {len(options.seeds)} seeds = {plan.jobs} fine-tuning jobs "
        f"({per_arm} per arm) → {place.where('eval')}"
    )
    return "\n".join(lines)


def run_study(plan: Plan, place: StudyPlace, rank: int | None, ray: bool) -> int:
    """Run what the plan has left; 0 when the study is complete (1 when evaluation jobs failed)."""
    study, driver = plan.study, not rank
    if not driver:
        for arm in plan.arms:
            _pretrain(plan, arm, place, rank, None, None)
        print(f"node {rank}: every arm is trained; node 0 evaluates and reports", flush=True)
        return 0
    place.lock()
    state = place.read_state()
    if _complete(plan, place, state):
        print((place.local / "results.md").read_text() + _figures_line(place), flush=True)
        return 0
    place.write_text("study.yaml", yaml.safe_dump(schema.to_dict(study.config), sort_keys=False))
    tags = {"sparsebert.study.output_dir": place.location.uri}
    run = StudyRun(study.config.mlflow.experiment, study.config.mlflow.tracking_uri, study.config.name,
                   state.get("mlflow_run_id"), tags)  # fmt: skip
    state.update(name=study.config.name, mlflow_run_id=run.run_id or state.get("mlflow_run_id"))
    try:
        for arm in plan.arms:
            _pretrain(plan, arm, place, rank, state, run)
        code = _evaluate_and_report(plan, place, state, run, ray)
    except StudyStopped as stop:
        run.end("KILLED" if stop.code == 0 else "FAILED")
        print(f"study: {stop}", file=sys.stderr, flush=True)
        return stop.code
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED" if code == 0 else "FAILED")
    return code


def _pretrain(plan: Plan, arm: ArmPlan, place: StudyPlace, rank: int | None, state: dict | None, run) -> None:
    """One arm's pre-training to its end (resumed from its checkpoint if it has one); a StudyStopped when it
    stops short."""
    if arm.status == FINISHED or (arm.status != NEW and place.finished(arm.dirname)):
        print(f"arm {arm.arm.name}: finished ({place.arm_dir(arm.dirname)}/final), skipped", flush=True)
        return
    if state is not None:
        _record(place, state, arm, "running")
    words = arm.command(plan.study, rank)
    verb = "resuming" if arm.status == RESUME else "starting"
    print(f"arm {arm.arm.name}: {verb} pre-training\n  {launch.show(words)}", flush=True)
    env = {**os.environ, **{str(k): str(v) for k, v in plan.study.config.launch.env.items()}}
    if run is not None and run.run_id:
        env[PARENT_RUN_ENV] = run.run_id  # the arm's MLflow run nests under the study's
    code, signalled = launch.run_launcher(words, env)
    if place.finished(arm.dirname):
        if state is not None:
            _record(place, state, arm, FINISHED)
        arm.status = FINISHED
        return
    if state is not None:
        _record(place, state, arm, "stopped" if code == 0 else "failed")
    again = "run the same command to resume it"
    if code == 0:
        raise StudyStopped(
            f"arm {arm.arm.name} stopped before its end (checkpointed); {again}", 0 if signalled else 1
        )
    raise StudyStopped(f"arm {arm.arm.name}: the launcher exited with status {code}; {again}", code)


def _record(place: StudyPlace, state: dict, arm: ArmPlan, status: str) -> None:
    state.setdefault("arms", {})[arm.arm.name] = arm_record(arm, status)
    place.write_state(state)


def _options(study: Study, place: StudyPlace, plan: Plan, run_id: str | None, ray: bool, local: bool = True):
    """The evaluation's options: the study's ``eval`` block and what the study sets (every arm's export, named
    after the arm, the study's MLflow run and experiment, ``resume``)."""
    from eval.options import EvalOptions

    values = dict(study.eval_options)
    finals = [
        str(place.final(a.dirname)) if local else f"{place.arm_dir(a.dirname)}/final" for a in plan.arms
    ]
    values.update(checkpoint=finals, labels=[a.arm.name for a in plan.arms], output=str(place.local / "eval"),
                  experiment=study.config.mlflow.experiment, tracking_uri=study.config.mlflow.tracking_uri,
                  parent_run_id=run_id, resume=True)  # fmt: skip
    if not ray:
        values["ray"] = False
    if study.corpus_tasks:
        values["glue_dir"] = str(place.local / "tasks")
    return schema.build(EvalOptions, values)


def _eval_key(options) -> str:
    """What decides the evaluation's results: its options without where and how the jobs run."""
    kept = {k: v for k, v in options.to_dict().items() if k not in RUNTIME}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _complete(plan: Plan, place: StudyPlace, state: dict) -> bool:
    """Every arm finished, evaluated with these options and reported: nothing to do."""
    if any(a.status != FINISHED for a in plan.arms) or not (place.local / "results.md").is_file():
        return False
    key = _eval_key(_options(plan.study, place, plan, None, ray=True))
    return state.get("eval", {}) == {"key": key, "status": FINISHED} and state.get("report") == key


def _evaluate_and_report(plan: Plan, place: StudyPlace, state: dict, run: StudyRun, ray: bool) -> int:
    from sparsebert.study import results

    options = _options(plan.study, place, plan, run.run_id, ray)
    key = _eval_key(options)
    if state.get("eval") != {"key": key, "status": FINISHED} or not (place.local / "summary.json").is_file():
        if plan.study.corpus_tasks:
            from sparsebert.study.corpus_tasks import write_tasks

            write_tasks(place.local / "tasks")
        state["eval"] = {"key": key, "status": "running"}
        place.write_state(state)
        failed = results.evaluate(plan, place, options)
        state["eval"] = {"key": key, "status": "failed" if failed else FINISHED}
        place.write_state(state)
        if failed:
            print(f"study: {failed} evaluation jobs failed (see {place.where('eval', 'failed_jobs.txt')}); "
                  "the table holds the others. Run the same command to retry them", file=sys.stderr)  # fmt: skip
    markdown = results.report_files(plan, place, run)
    state["report"] = key
    place.write_state(state)
    print(f"\n{markdown}{_figures_line(place)}", flush=True)
    return 1 if state["eval"]["status"] != FINISHED else 0


def _figures_line(place: StudyPlace) -> str:
    return f"\ntable: {place.where('results.md')}; figures: {place.where('figures')}/\n"
