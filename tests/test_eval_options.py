"""``EvalOptions``: one declaration of an evaluation's settings that the command line, YAML files and
``run_evaluation`` share; errors name the key (and its flag); ``--help-config`` answers before anything heavy."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from eval.jobs import DataSource, FinetuneConfig
from eval.options import EvalOptions
from eval.run import build_parser, main, options_from_args
from sparsebert.schema import ConfigError

STUDY = """
checkpoint: [runs/star/final, runs/dense/final]
labels: [star, dense]
tasks: [all]
lrs: [2e-5, 3e-5]
seeds: [1, 2]
epochs: 2
glue_dir: data/glue
squad_dir: data/squad
ray: false
"""


def test_yaml_keys_are_the_flags_names():
    from_yaml = EvalOptions.from_dict(yaml.safe_load(STUDY))
    from_flags = options_from_args(
        build_parser().parse_args(
            ["--checkpoint", "runs/star/final", "runs/dense/final", "--labels", "star,dense", "--tasks", "all",
             "--lrs", "2e-5,3e-5", "--seeds", "1,2", "--epochs", "2", "--glue-dir", "data/glue", "--squad-dir",
             "data/squad", "--no-ray"]
        )
    )  # fmt: skip
    assert from_yaml == from_flags
    assert from_yaml.lrs == (2e-5, 3e-5) and from_yaml.seeds == (1, 2) and not from_yaml.ray
    assert from_yaml.finetune == FinetuneConfig(epochs=2.0) and from_yaml.data.squad_dir == "data/squad"
    assert from_yaml.task_names[-2:] == ["squad", "squad_v2"] and "mnli" in from_yaml.task_names
    from_yaml.check_runnable()
    assert (
        EvalOptions.from_dict(yaml.safe_load(yaml.safe_dump(from_yaml.to_dict()))) == from_yaml
    )  # round trip


def test_defaults_are_declared_once():
    """No flag, no file: the options are the dataclasses' defaults (argparse holds none of its own)."""
    options = options_from_args(build_parser().parse_args([]))
    assert options == EvalOptions() and options.finetune == FinetuneConfig() and options.data == DataSource()
    flags = {a.dest for a in build_parser()._actions}
    for section in (FinetuneConfig, DataSource):
        assert {f.name for f in dataclasses.fields(section)} <= flags  # every key is a flag


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epoch": 2}, "unknown config key 'epoch'; known keys here: attention_backend, attention_pattern, "),
        (
            {"tasks": ["sst2", "bogus"]},
            "config key 'tasks' (--tasks): unknown task 'bogus'; choose from glue, ",
        ),
        ({"tasks": "glue"}, "config key 'tasks' (--tasks) must be a list of str, got 'glue'"),
        ({"lrs": []}, "config key 'lrs' (--lrs) is empty: name at least one"),
        ({"seeds": [1.5]}, "config key 'seeds' (--seeds) must be a list of int, got [1.5]"),
        ({"batch_size": 0}, "config key 'batch_size' (--batch-size) must be >= 1, got 0"),
        ({"device": "gpu"}, "config key 'device' (--device) must be one of auto, cuda, cpu, got 'gpu'"),
        (
            {"attention_backend": "fast"},
            "config key 'attention_backend' (--attention-backend) must be one of auto,",
        ),
        ({"checkpoint": ["a", "b"], "labels": ["x"]}, "config key 'labels' (--labels) gives 1 labels for 2 "),
        (
            {"ray": False, "ray_address": "auto", "gpus_per_job": 1},
            "config keys 'ray_address' (--ray-address), 'gpus_per_job' (--gpus-per-job) only for Ray: not "
            "allowed with --no-ray",
        ),
    ],
)
def test_a_bad_option_is_an_error_naming_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        EvalOptions.from_dict(data)
    assert str(info.value).startswith(message), str(info.value)


def test_what_a_run_needs_is_checked_before_it_starts():
    with pytest.raises(ConfigError, match=r"'checkpoint' \(--checkpoint\) is empty"):
        EvalOptions().check_runnable()
    with pytest.raises(ConfigError, match=r"'squad_dir' \(--squad-dir\) is needed by squad, squad_v2"):
        EvalOptions(
            checkpoint=["c"], tasks=["rte", "squad", "squad_v2"], data=DataSource("g")
        ).check_runnable()
    EvalOptions(checkpoint=["c"], tasks=["all"], data=DataSource(hub=True)).check_runnable()
    assert EvalOptions(checkpoint=[Path("c")], output=Path("out")).output == "out"  # paths as text


def test_help_config_shows_the_file_and_the_flags(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(STUDY)
    assert main(["--config", str(config), "--epochs", "4", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"config: {config} and the flags given\n")
    assert "epochs = 4.0   (default: 3.0)" in out  # the flag overrides the file
    assert "lrs = (2e-05, 3e-05)   (default: (2e-05, 3e-05, 5e-05))" in out
    assert "ray = False   (default: True)" in out and "[--ray / --no-ray]" in out
    assert "    SQuAD: tokens shared by consecutive windows of a context [--doc-stride]" in out


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    probe = (
        "import sys; from eval.run import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted({'torch', 'ray', 'mlflow', 'deepspeed', 'transformers'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_config_and_option_errors_answer_before_anything_heavy(tmp_path):
    shown = _run("--help-config", "--tasks", "all", cwd=tmp_path)
    assert shown.stdout.splitlines()[-1] == "0 []", shown.stderr
    assert "tasks = ('all',)   (default: ('glue',))" in shown.stdout
    for argv, fragment in [
        (["--help-config", "--tasks", "nope"], "config key 'tasks' (--tasks): unknown task 'nope'"),
        (
            ["--checkpoint", "c", "--lrs", "fast"],
            "config key 'lrs' (--lrs) must be a list of float, got 'fast'",
        ),
        (["--config", "missing.yaml"], "config file 'missing.yaml' not found"),
    ]:
        failed = _run(*argv, cwd=tmp_path)
        assert failed.stdout.strip() == "2 []", failed.stderr
        [line] = failed.stderr.splitlines()
        assert line.startswith("python -m eval.run: error: ") and fragment in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written
