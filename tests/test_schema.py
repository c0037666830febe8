"""``sparsebert.schema``, the one way every entry point declares its settings: errors name the key (and its flag),
``--help-config`` renders every key, flags derive from the fields and land on the same checks as YAML."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sparsebert import schema
from sparsebert.schema import ConfigError, ConfigTypeError


@dataclass(frozen=True)
class Recipe:
    lr: float = schema.setting(1e-3, "peak learning rate", cli=True, bounds=(0, None))
    steps: int | None = schema.setting(None, "optimizer steps; null = one epoch", cli=True, metavar="N")
    decay: str = schema.setting("linear", "after warm-up", cli=True, choices=("linear", "constant"))

    def __post_init__(self) -> None:
        schema.validate(self)


@dataclass
class Logging:
    every: int = schema.setting(10, "steps between logs", bounds=(1, None))


@dataclass(frozen=True, kw_only=True)
class Options:
    names: tuple[str, ...] = schema.setting(("a",), "what to run", cli=True, sep=",")
    paths: tuple[str, ...] = schema.setting((), "inputs", cli=True, convert=schema.paths, metavar="PATH")
    seeds: tuple[int, ...] = schema.setting((1, 2), "seeds", cli=True, sep=",", group="runs")
    fast: bool = schema.setting(False, "skip the slow part", cli=True, group="runs")
    progress: bool = schema.setting(True, "show progress", cli=True, group="runs")
    size_bytes: int = schema.setting(1 << 20, "unit of work", cli=True, flag="--size-mb", scale=1 << 20)
    pattern: str | dict | None = schema.setting(None, "a name or a spec", cli=True)
    recipe: Recipe = schema.section(Recipe, flat=True)
    log: Logging = schema.section(Logging)
    hidden: float = schema.setting(0.5, "not a flag", bounds=(0, 1))

    def __post_init__(self) -> None:
        schema.validate(self)


def test_build_reads_yaml_values_and_keeps_defaults():
    options = schema.build(
        Options, {"names": ["x", "y"], "lr": "2e-5", "seeds": [3], "log": {"every": 5}, "pattern": {"n": 1}}
    )
    assert options.names == ("x", "y") and options.seeds == (3,)  # lists become the declared tuples
    assert options.recipe == Recipe(
        lr=2e-5
    )  # a flat section's keys sit at the top; YAML 1.1's "2e-5" is a float
    assert options.log.every == 5 and options.pattern == {"n": 1} and options.hidden == 0.5


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            {"nmes": ["x"]},
            ConfigError,
            "unknown config key 'nmes'; known keys here: decay, fast, hidden, log, lr, names, ",
        ),
        ({"log": {"evry": 1}}, ConfigError, "unknown config key 'log.evry'"),
        ({"log": 3}, ConfigError, "config key 'log' must be a section (mapping)"),
        ({"lr": "fast"}, ConfigTypeError, "config key 'lr' (--lr) must be float, got 'fast'"),
        ({"steps": 2.5}, ConfigTypeError, "config key 'steps' (--steps) must be int or null, got 2.5"),
        ({"fast": "yes"}, ConfigTypeError, "config key 'fast' (--fast) must be bool, got 'yes'"),
        (
            {"seeds": [1, "x"]},
            ConfigTypeError,
            "config key 'seeds' (--seeds) must be a list of int, got [1, 'x']",
        ),
        ({"names": "x"}, ConfigTypeError, "config key 'names' (--names) must be a list of str, got 'x'"),
        (
            {"decay": "cosine"},
            ConfigError,
            "config key 'decay' (--decay) must be one of linear, constant, got",
        ),
        ({"lr": -1}, ConfigError, "config key 'lr' (--lr) must be >= 0, got -1.0"),
        ({"hidden": 2}, ConfigError, "config key 'hidden' must be in [0, 1], got 2.0"),  # no flag to name
        ({"log": {"every": 0}}, ConfigError, "config key 'log.every' must be >= 1, got 0"),
    ],
)
def test_errors_are_one_line_and_name_the_key(data, error, message):
    with pytest.raises(error) as info:
        schema.build(Options, data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_validate_checks_and_normalises_an_instance_made_in_python():
    options = Options(names=["x"], paths=[Path("a"), "b"], recipe=Recipe(lr=1))
    assert options.names == ("x",) and options.paths == ("a", "b") and options.recipe.lr == 1.0
    assert isinstance(options.recipe.lr, float)
    with pytest.raises(ConfigTypeError, match=r"'lr' \(--lr\) must be float, got '1e-4'"):
        Recipe(lr="1e-4")  # no YAML leniency for Python values
    with pytest.raises(TypeError, match="'steps'"):  # a ConfigTypeError is a TypeError (and a ValueError)
        Recipe(steps=True)  # a bool is no number
    with pytest.raises(ConfigTypeError, match="config key 'recipe' must be a Recipe"):
        Options(recipe={"lr": 1})


def test_describe_lists_every_key_with_its_value_meaning_default_and_flag():
    text = schema.describe(schema.build(Options, {"lr": 0.1, "fast": True}), "run.yaml")
    lines = text.splitlines()
    assert lines[0] == "config: run.yaml"
    assert "lr = 0.1   (default: 0.001)" in lines
    assert "    peak learning rate [--lr]" in lines
    assert "decay = 'linear'" in lines and "    after warm-up (one of: linear, constant) [--decay]" in lines
    assert (
        "    show progress [--progress / --no-progress]" in lines
    )  # a switch that is on: how to turn it off
    assert "    unit of work [--size-mb]" in lines and "log.every = 10" in lines
    assert "    not a flag" in lines  # no flag to show
    assert schema.describe(Options()).startswith("config: the built-in defaults\n")


def _parse(*argv: str) -> tuple[argparse.ArgumentParser, Options]:
    parser = argparse.ArgumentParser(prog="prog")
    schema.add_flags(parser, Options)
    return parser, schema.build(Options, schema.flag_values(Options, parser.parse_args(argv)))


def test_flags_derive_from_the_fields_and_only_given_ones_count():
    parser, options = _parse()
    assert options == Options()  # nothing given: every default stands (a config file's value would too)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert flags == {
        *("-h", "--names", "--paths", "--seeds", "--fast", "--progress", "--size-mb", "--pattern"),
        *("--lr", "--steps", "--decay"),
    }  # the flat section's fields too; neither "hidden" (no flag) nor the nested section
    help_text = parser.format_help()
    assert "(default: 1,2)" in help_text and "(default: 1)" in help_text and "--no-progress" in help_text
    _, options = _parse(
        "--names", "x,y", "--paths", "p", "q", "--seeds", "4,5,", "--fast", "--no-progress", "--size-mb", "0.5",
        "--pattern", "{name: longformer, window: 4}", "--lr", "3e-5", "--steps", "7",
    )  # fmt: skip
    assert options == Options(
        names=("x", "y"), paths=("p", "q"), seeds=(4, 5), fast=True, progress=False, size_bytes=1 << 19,
        pattern={"name": "longformer", "window": 4}, recipe=Recipe(lr=3e-5, steps=7),
    )  # fmt: skip
    assert _parse("--pattern", "star")[1].pattern == "star"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "1,x"], "config key 'seeds' (--seeds) must be a list of int, got 'x'"),
        (["--steps", "many"], "config key 'steps' (--steps) must be int or null, got 'many'"),
        (["--decay", "cosine"], "config key 'decay' (--decay) must be one of linear, constant, got 'cosine'"),
        (["--size-mb", "half"], "config key 'size_bytes' (--size-mb) must be int, got 'half'"),
        (["--pattern", "{name: [}"], "config key 'pattern' (--pattern): '{name: [}' is not a mapping"),
    ],
)
def test_a_bad_flag_is_the_schemas_one_line_error(argv, message):
    with pytest.raises(ConfigError) as info:
        _parse(*argv)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_yaml_files_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nlog:\n  every: 3\n")
    data = schema.apply_overrides(schema.read_yaml(path), ["log.every=4", "names=[p, q]", "steps="])
    assert data == {"lr": "1e-4", "log": {"every": 4}, "names": ["p", "q"], "steps": None}
    assert schema.build(Options, data).recipe.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"not of the form dotted\.key=value"):
        schema.apply_overrides({}, ["lr"])
    with pytest.raises(ConfigError, match="config key 'lr' is not a section"):
        schema.apply_overrides({"lr": 1}, ["lr.x=2"])
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' not found"):
        schema.read_yaml(tmp_path / "nope.yaml")
    path.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        schema.read_yaml(path)
    assert "\n" not in str(info.value)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys, not list"):
        schema.read_yaml(path)


def test_to_dict_gives_back_the_keys_build_reads():
    options = schema.build(Options, {"names": ["x"], "lr": 0.5, "log": {"every": 2}, "pattern": {"n": 1}})
    data = schema.to_dict(options)
    assert data["names"] == ["x"] and data["lr"] == 0.5 and data["log"] == {"every": 2}  # flat, nested, plain
    assert schema.build(Options, data) == options


def test_list_defaults_are_not_shared_between_instances():
    @dataclass
    class Holder:
        items: list = schema.setting([1], "items")
        table: dict = field(default_factory=dict)

    first, second = Holder(), Holder()
    first.items.append(2)
    assert second.items == [1]
