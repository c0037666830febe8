"""The entry points as a new user meets them: fast help, one-line errors (exit 2), configs that shorten by
``train.max_steps`` alone, inputs checked before any job starts, progress that suits a log file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PRETRAIN, REPO

from sparsebert import console
from sparsebert.train.config import ConfigError, load_config


def _python(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["sparsebert.pretrain", "eval.run", "data_prep.cli"])
def test_entry_points_import_no_heavy_library(module):
    """``--help`` and config errors answer without DeepSpeed, Ray or MLflow (which take seconds to import)."""
    probe = f"import sys, {module}; print(sorted({{'deepspeed', 'ray', 'mlflow'}} & set(sys.modules)))"
    result = _python("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz'"),
        (["train.lr=fast"], "config key 'train.lr' must be float"),
        (["model.attention_pattern=bogus"], "unknown attention pattern 'bogus'"),
        (["--config", "no_such_preset"], "config file 'no_such_preset' not found"),
        (["dam.search_steps=5000"], "'dam.search_steps' must be between 1 and train.max_steps - 1"),
        (["output_dir=hdfs://nn/runs/x"], "config key 'output_dir': 'hdfs://nn/runs/x' has scheme hdfs://"),
        (
            ["output_dir=s3a:/bucket/x"],
            "config key 'output_dir': 's3a:/bucket/x' is not a supported location",
        ),
        (["data.path=http://host/corpus"], "config key 'data.path': 'http://host/corpus' has scheme http://"),
        (
            ["model.init_from=s3://bucket/run/final"],
            "config key 'model.init_from': 's3://bucket/run/final' is in",
        ),
    ],
)
def test_config_errors_are_one_line_and_exit_2(overrides, fragment, monkeypatch, capsys):
    from sparsebert import pretrain

    monkeypatch.setenv("SPARSEBERT_VERBOSE", "1")  # what -v sets, restored after the test
    assert pretrain.main(["-v", *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err


def test_the_script_prints_a_config_error_alone_and_exits_2():
    """The same, through the script the launchers run (the in-process test above covers every message)."""
    result = _python(str(PRETRAIN), "train.max_stepz=3")
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: unknown config key 'train.max_stepz'"), result.stderr


def test_help_config_shows_the_presets_values_and_the_search_rule():
    result = _python(str(PRETRAIN), "--help-config", "--config", "tiny_cpu", "train.max_steps=50")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("config: tiny_cpu")
    assert "train.max_steps = 50   (default: 300)" in out
    assert "model.attention_pattern = {'name': 'dam_s'" in out
    assert "null = dam.search_fraction × train.max_steps" in out


@pytest.mark.parametrize("preset", ["tiny_cpu", "dam_s_search"])
def test_max_steps_alone_shortens_a_dam_preset(preset):
    full = load_config(preset)
    short = load_config(preset, ["train.max_steps=10"])
    assert 0 < short.search_steps < 10
    assert short.search_steps == round(full.dam.search_fraction * 10)
    assert full.search_steps == round(full.dam.search_fraction * full.train.max_steps)


def test_search_length_rules():
    assert load_config("tiny_cpu", ["train.max_steps=2"]).search_steps == 1  # at least one step of each stage
    assert load_config("tiny_cpu", ["dam.search_steps=7"]).search_steps == 7  # explicit wins
    assert load_config("tiny_cpu", ["model.attention_pattern=star"]).search_steps == 0  # nothing to search
    with pytest.raises(ConfigError, match=r"'dam\.search_fraction' must be between 0 and 1"):
        load_config("tiny_cpu", ["dam.search_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"'train\.max_steps' must be >= 2 to search"):
        load_config("tiny_cpu", ["train.max_steps=1"])


def test_eval_run_checks_inputs_before_ray(tmp_path):
    """A wrong --glue-dir fails at once with one line naming the file: no Ray, no MLflow run, no jobs."""
    from eval.smoke import write_glue, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    probe = (
        "import sys; from eval.run import main; "
        "rc = main(sys.argv[1:]); print(rc, sorted({'ray', 'mlflow'} & set(sys.modules)))"
    )
    missing = _python(
        "-c", probe, "--checkpoint", str(ckpt), "--tasks", "sst2,mrpc", "--glue-dir", str(tmp_path / "nowhere"),
        cwd=tmp_path,
    )  # fmt: skip
    assert missing.stdout.strip() == "2 []", missing.stderr
    [line] = missing.stderr.splitlines()
    assert (
        line.startswith("python -m eval.run: error: sst2: ") and "nowhere/SST-2/train.tsv not found" in line
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "eval_results").exists()

    glue = write_glue(tmp_path / "glue")
    (glue / "MRPC" / "dev.tsv").write_text(
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tonly text\n"
    )
    malformed = _python(
        "-c", probe, "--checkpoint", str(ckpt), "--tasks", "sst2,mrpc", "--glue-dir", str(glue), cwd=tmp_path
    )
    assert malformed.stdout.strip() == "2 []", malformed.stderr
    [line] = malformed.stderr.splitlines()
    assert "MRPC/dev.tsv: line 2, column 5: expected 5 tab-separated columns, found 4" in line

    not_a_model = _python(
        "-c", probe, "--checkpoint", str(tmp_path), "--tasks", "sst2", "--glue-dir", str(glue)
    )
    assert "no config.json in it" in not_a_model.stderr


def test_eval_smoke_help_writes_nothing(tmp_path):
    result = _python("-m", "eval.smoke", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: python -m eval.smoke" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_progress_without_a_terminal_is_plain_and_rare(monkeypatch):
    stream = io.StringIO()  # not a TTY, like a log file or a pipe
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("SPARSEBERT_VERBOSE", raising=False)
    bar = console.progress(total=500, enabled=True, desc="steps")
    assert isinstance(bar, console.PlainProgress)
    for _ in range(500):
        bar.update(1)
        bar.set_postfix(loss="1.000")
    bar.close()
    assert stream.getvalue() == "steps: 500/500  loss=1.000\n"  # only the end: 500 steps took under 30 s
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_usage_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert console.usage_error(ConfigError("bad key")) == 2
    monkeypatch.setenv("RANK", "0")
    assert console.usage_error(ConfigError("bad key")) == 2
    assert capsys.readouterr().err == "error: bad key\n"
