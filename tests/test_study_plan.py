"""The study file and its plan, without launching anything: parsing and its one-line errors, the dry run, and the
decisions the same command takes on a study directory found in each state (new, interrupted, finished, changed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsebert.schema import ConfigError
from sparsebert.study.config import arm_overrides, load_study
from sparsebert.study.place import StudyPlace
from sparsebert.study.plan import CHANGED, FINISHED, NEW, RESUME, arm_record, make_plan


def _study_file(tmp_path: Path, **changes) -> Path:
    data = {
        "name": "unit",
        "output_dir": str(tmp_path / "out"),
        "pretrain": {"config": "tiny_cpu", "overrides": {"train.max_steps": 20}},
        "arms": {
            "dense": {"model.attention_pattern": "dense"},
            "star": {"model": {"attention_pattern": "star"}},
        },
        "launch": {"num_gpus": 1},
        "eval": {"tasks": ["docs_order"], "lrs": [1e-4], "seeds": [1, 2]},
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsebert.study", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_study_file_reads_into_checked_arms(tmp_path):
    study = load_study(str(_study_file(tmp_path)), ["arms.star.train.lr=1e-3"])
    assert [a.name for a in study.arms] == ["dense", "star"]
    star = study.arms[1]
    assert star.config.model.attention_pattern == "star" and star.config.train.lr == 1e-3
    assert star.config.train.max_steps == 20  # the base's overrides reach every arm
    assert study.reference == "dense" and study.corpus_tasks == ["docs_order"]
    dam = load_study(str(_study_file(tmp_path)), ["arms.dam_s.model.attention_pattern={name: dam_s}"])
    # a DAM search (8 of the 20 steps) split into importance_snapshots (20) parts: a snapshot every step
    assert dam.arms[2].config.search_steps == 8 and arm_overrides(dam, dam.arms[2])["dam.snapshot_every"] == 1
    assert arm_overrides(dam, dam.arms[2])["train.max_steps"] == 20
    assert "dam.snapshot_every" not in arm_overrides(dam, dam.arms[0])


def test_presets_load_with_the_paper_rows(tmp_path):
    paper = load_study("paper_table")
    assert len(paper.arms) == 15 and paper.config.paper
    twins = load_study("paper_table", ["no_diagonal_variants=true"])
    # fixed patterns get a twin without the diagonal; a learned mask decides about its diagonal itself
    assert len(twins.arms) == 22 and twins.arms[1].name == "dense_nodiag"
    assert {a.name for a in load_study("tiny_study").arms} == {"dense", "no_diagonal", "longformer", "dam_s"}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("bogus=1", "'bogus'"),
        ("arms.dense.model.attention_pattern=nope", "arm 'dense'"),
        ("arms.dense.output_dir=/x", "'arms.dense.output_dir'"),
        ("eval.lrs=oops", "eval.lrs"),
        ("eval.output=/x", "'eval.output'"),
        ("reference=nobody", "'reference'"),
        ("importance_snapshots=-1", "importance_snapshots"),
    ],
)
def test_a_bad_key_is_an_error_naming_it(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named):
        load_study(str(_study_file(tmp_path)), [override])


def test_the_command_line_refuses_bad_input_in_one_line_with_status_2(tmp_path):
    path = _study_file(tmp_path)
    for args in ([str(path), "bogus=1"], ["--config", "no_such_preset"], []):
        done = _cli(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "error:" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything starts


def test_the_dry_run_prints_each_launch_and_the_job_count_and_runs_nothing(tmp_path):
    done = _cli(str(_study_file(tmp_path)), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    launches = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("deepspeed ")]
    assert len(launches) == 2
    assert "--num_gpus 1" in launches[0] and f"output_dir={tmp_path}/out/arms/dense" in launches[0]
    assert "model.attention_pattern=star" in launches[1]
    assert "= 4 fine-tuning jobs (2 per arm)" in done.stdout
    assert not (tmp_path / "out").exists()


def _finish(place: StudyPlace, dirname: str) -> None:
    final = place.local / "arms" / dirname / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")


def test_the_plan_skips_finished_arms_and_resumes_interrupted_ones(tmp_path):
    study = load_study(str(_study_file(tmp_path)))
    place = StudyPlace(study.output_dir)
    assert [a.status for a in make_plan(study, place, {}, False).arms] == [NEW, NEW]
    _finish(place, "dense")
    (place.local / "arms" / "star" / "checkpoints").mkdir(parents=True)  # stopped after a checkpoint
    plan = make_plan(study, place, {}, False)
    assert [a.status for a in plan.arms] == [FINISHED, RESUME]
    assert plan.jobs == 4
    plan.check()  # nothing refused


def test_a_changed_arm_is_refused_naming_its_keys_unless_allowed(tmp_path):
    study = load_study(str(_study_file(tmp_path)))
    place = StudyPlace(study.output_dir)
    _finish(place, "dense")
    state = {"arms": {a.arm.name: arm_record(a, FINISHED) for a in make_plan(study, place, {}, False).arms}}
    place.write_state(state)
    changed = load_study(str(_study_file(tmp_path)), ["arms.dense.train.lr=1e-2", "arms.dense.train.seed=7"])
    plan = make_plan(changed, place, place.read_state(), False)
    assert plan.arms[0].status == CHANGED and plan.arms[0].changed == ["train.lr", "train.seed"]
    with pytest.raises(ConfigError, match=r"arm 'dense' .* train\.lr, train\.seed; .*--allow-changes"):
        plan.check()
    allowed = make_plan(changed, place, place.read_state(), True)
    assert (allowed.arms[0].status, allowed.arms[0].dirname, allowed.arms[0].replaces) == (
        NEW,
        "dense.v2",
        "dense",
    )
    # a key that does not change what is computed (where logs go, the checkpoint cadence) changes nothing
    neutral = load_study(str(_study_file(tmp_path)), ["arms.dense.checkpoint.every=3"])
    assert make_plan(neutral, place, place.read_state(), False).arms[0].status == FINISHED


def test_a_corrupt_state_is_an_error_naming_the_file(tmp_path):
    study = load_study(str(_study_file(tmp_path)))
    place = StudyPlace(study.output_dir)
    place.local.mkdir(parents=True)
    (place.local / "study.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"study\.json is not the study's state"):
        place.read_state()
    done = _cli(str(_study_file(tmp_path)), "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "study.json" in done.stderr
    assert (place.local / "study.json").read_text() == "{not json"  # kept as it was
