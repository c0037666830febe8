"""``PrepOptions``: one declaration of the settings, checked once, that the command line and the manifest
are built from (no Ray needed here)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep import HfSource, PrepOptions, prepare_corpus
from data_prep.cli import build_parser, main, options_from_args
from sparsebert import schema


def _cli(*flags: str) -> PrepOptions:
    return options_from_args(build_parser().parse_args(["--input", "x.txt", "--output", "out", *flags]))


def test_every_setting_is_documented_and_the_defaults_are_valid():
    options = PrepOptions()
    for f in dataclasses.fields(PrepOptions):
        assert f.metadata["help"] and f.metadata["group"], f.name
    assert (options.seq_len, options.vocab_size, options.train_tokenizer, options.packing) == (
        128,
        8192,
        "wordpiece",
        "nsp",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seq_len = 256  # type: ignore[misc]
    with pytest.raises(TypeError):
        PrepOptions(128)  # type: ignore[misc]  # keywords only: the fields have no meaningful order


@pytest.mark.parametrize(
    ("changes", "error", "names"),
    [
        ({"seq_len": 4}, ValueError, "seq_len"),
        ({"seq_len": 40000}, ValueError, "seq_len"),
        ({"packing": "roberta"}, ValueError, "packing"),
        ({"train_tokenizer": "bpe"}, ValueError, "train_tokenizer"),
        ({"vocab_size": 8}, ValueError, "vocab_size"),
        ({"shard_size": 0}, ValueError, "shard_size"),
        ({"docs_per_group": 0}, ValueError, "docs_per_group"),
        ({"num_workers": 0}, ValueError, "num_workers"),
        ({"short_seq_prob": 1.5}, ValueError, "short_seq_prob"),
        ({"random_next_prob": -0.1}, ValueError, "random_next_prob"),
        ({"rows_per_document": 0}, ValueError, "rows_per_document"),
        ({"unit_bytes": 0}, ValueError, "unit_bytes"),
        ({"seq_len": "128"}, TypeError, "seq_len"),
        ({"seq_len": 128.0}, TypeError, "seq_len"),
        ({"shard_size": True}, TypeError, "shard_size"),
        ({"lowercase": "yes"}, TypeError, "lowercase"),
        ({"num_workers": 1.5}, TypeError, "num_workers"),
        ({"hf_datasets": "wikimedia/wikipedia"}, TypeError, "hf_datasets"),
        ({"hf_datasets": [["wikimedia/wikipedia", "20231101.en", "colum=x"]]}, ValueError, "wikipedia"),
        ({"validation_fraction": 1.0}, ValueError, "validation_fraction"),
        ({"validation_fraction": -0.1}, ValueError, "validation_fraction"),
        ({"validation_fraction": "0.1"}, TypeError, "validation_fraction"),
        ({"validation_fraction": True}, TypeError, "validation_fraction"),
        ({"validation_inputs": "held_out.txt"}, TypeError, "validation_inputs"),
        ({"validation_inputs": [1]}, TypeError, "validation_inputs"),
        ({"validation_fraction": 0.1, "validation_inputs": ["v.txt"]}, ValueError, "alternatives"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_field(changes, error, names):
    with pytest.raises(error, match=names):
        PrepOptions(**changes)
    with pytest.raises(error, match=names):  # replace() checks the same way
        dataclasses.replace(PrepOptions(), **changes)


def test_values_are_normalised():
    options = PrepOptions(
        tokenizer=Path("tok"),
        hf_datasets=["a", ["b", "cfg", "split=validation"], HfSource("c", rows_per_document=3)],
        short_seq_prob=0,
    )
    assert options.tokenizer == "tok"
    assert options.hf_datasets == (
        HfSource("a"),
        HfSource("b", config="cfg", split="validation"),
        HfSource("c", rows_per_document=3),
    )
    assert dataclasses.replace(options) == options  # parsing again is a no-op


def test_manifest_sections_are_the_fields_asdict():
    options = PrepOptions(hf_datasets=["a"], num_workers=3)
    assert options.recorded("top") == {"seq_len": 128, "seed": 0, "packing": "nsp"}
    assert options.recorded("run") == {"num_workers": 3, "ray_address": None}
    config = options.recorded("config")
    assert set(config) == {
        *("shard_size", "short_seq_prob", "random_next_prob", "docs_per_group", "unit_bytes"),
        *("max_line_length", "rows_per_document", "doc_per_file", "text_column", "tokenizer_sample_bytes"),
        "hf_datasets",
        "sentence_splitter",
    }
    assert config["hf_datasets"] == [dataclasses.asdict(HfSource("a"))]  # a list, as JSON reads it back
    assert {k: v for k, v in dataclasses.asdict(options).items() if k in config} == {
        **config,
        "hf_datasets": tuple(config["hf_datasets"]),
    }
    with pytest.raises(ValueError, match="section"):
        options.recorded("tokenizer")
    # Recorded only when a validation split is written (a section of its own: "config" stays as it was).
    assert options.recorded("validation") == {"validation_fraction": 0.0, "validation_inputs": []}
    assert not options.has_validation
    held = PrepOptions(validation_inputs=[Path("v.txt"), "w/"])
    assert held.validation_inputs == ("v.txt", "w/") and held.has_validation
    assert PrepOptions(validation_fraction=0).validation_fraction == 0.0  # a float, as the manifest records


def test_command_line_defaults_are_the_options_defaults():
    assert _cli() == PrepOptions()
    flags = {a.dest for a in build_parser()._actions}
    not_on_it = {f.name for f in dataclasses.fields(PrepOptions)} - flags
    assert not_on_it == {"random_next_prob"}


def test_command_line_flags_become_options():
    options = _cli(
        "--seq-len", "256", "--packing", "full_sentences", "--no-lowercase", "--unit-mb", "0.5",
        "--tokenizer-sample-mb", "1", "--tokenizer", "tok", "--num-workers", "3", "--doc-per-file",
        "--hf-dataset", "a", "cfg", "--hf-dataset", "b", "column=body", "--hf-column", "sentence",
        "--short-seq-prob", "0.25", "--overwrite",
    )  # fmt: skip
    assert options == PrepOptions(
        seq_len=256,
        packing="full_sentences",
        lowercase=False,
        unit_bytes=1 << 19,
        tokenizer_sample_bytes=1 << 20,
        tokenizer="tok",
        num_workers=3,
        doc_per_file=True,
        hf_datasets=[["a", "cfg", "column=sentence"], ["b", "column=body"]],
        short_seq_prob=0.25,
        overwrite=True,
    )
    assert not _cli("--quiet").progress and not _cli("--no-progress").progress and _cli().progress
    assert _cli("--validation-fraction", "0.05") == PrepOptions(validation_fraction=0.05)
    assert _cli("--validation-input", "v.txt", "more/").validation_inputs == ("v.txt", "more/")
    with pytest.raises(SystemExit):
        _cli("--validation-fraction", "0.05", "--validation-input", "v.txt")  # one or the other
    with pytest.raises(SystemExit):
        _cli("--tokenizer", "tok", "--train-tokenizer", "sentencepiece")  # one or the other


def test_command_line_reports_a_bad_value_by_name(tmp_path, capsys):
    assert main(["--input", "x.txt", "--output", str(tmp_path / "out"), "--seq-len", "4"]) == 2
    assert "seq_len" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_corpus_takes_options_and_keyword_settings(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        prepare_corpus([tmp_path / "x.txt"], tmp_path / "out", PrepOptions(), seq_len=4)
    with pytest.raises(ValueError, match="docs_per_group"):
        prepare_corpus([tmp_path / "x.txt"], tmp_path / "out", docs_per_group=0)
    with pytest.raises(TypeError, match="not_a_setting"):
        prepare_corpus([tmp_path / "x.txt"], tmp_path / "out", not_a_setting=1)
    with pytest.raises(FileNotFoundError, match=r"x\.txt"):  # valid settings: on to the inputs
        prepare_corpus([tmp_path / "x.txt"], tmp_path / "out", PrepOptions(seq_len=64), progress=False)


def test_help_config_lists_every_option_and_needs_no_input(capsys):
    assert main(["--help-config", "--seq-len", "256", "--unit-mb", "2", "--no-lowercase"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config: the defaults and the flags given\n")
    assert "seq_len = 256   (default: 128)" in out and "    tokens per sample incl. special tokens" in out
    assert "unit_bytes = 2097152   (default: 8388608)" in out and "[--unit-mb MB]" in out
    assert "lowercase = False   (default: True)" in out and "[--lowercase / --no-lowercase]" in out
    assert all(
        f"\n{f.name} = " in out for f in dataclasses.fields(PrepOptions)
    )  # every option, even flagless


def test_a_config_file_and_flags_make_the_same_options(tmp_path):
    config = tmp_path / "prep.yaml"
    config.write_text(
        "seq_len: 64\npacking: full_sentences\nunit_bytes: 1048576\n"
        "hf_datasets: [[a, cfg], {name: b, split: validation}]\n"
    )
    options = _cli(
        "--config", str(config), "--vocab-size", "100", "--seq-len", "32"
    )  # flags override the file
    assert options == PrepOptions(
        seq_len=32, packing="full_sentences", unit_bytes=1 << 20, vocab_size=100,
        hf_datasets=[HfSource("a", config="cfg"), HfSource("b", split="validation")],
    )  # fmt: skip
    assert schema.build(PrepOptions, yaml.safe_load(yaml.safe_dump(schema.to_dict(options)))) == options


def test_option_errors_are_one_line_exit_2_and_import_nothing_heavy(tmp_path):
    probe = (
        "import sys; from data_prep.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted({'torch', 'ray', 'transformers', 'datasets'} & set(sys.modules)))"
    )
    for argv, line in [
        (
            ["--input", "x", "--output", "y", "--seq-len", "abc"],
            "error: config key 'seq_len' (--seq-len) must be int",
        ),
        (
            ["--help-config", "--packing", "roberta"],
            "error: config key 'packing' (--packing) must be one of nsp, ",
        ),
        (["--input", "x.txt"], "error: give --output DIR: where the corpus goes"),
    ]:
        result = subprocess.run(
            [sys.executable, "-c", probe, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.stdout.strip() == "2 []", result.stderr
        [error] = result.stderr.splitlines()
        assert error.startswith(line), error
    assert list(tmp_path.iterdir()) == []
