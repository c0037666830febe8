"""Settings declared once: dataclasses whose fields carry their default and meaning, read alike from YAML files,
command lines and Python, with one-line errors that name the key. Pre-training (``sparsebert.train.config``),
``data_prep.options.PrepOptions`` and ``eval.options.EvalOptions`` are declared this way.

:func:`setting` declares a field (default, help, accepted values, command-line spelling), :func:`section` nests a
dataclass; :func:`build` makes one from a mapping and :func:`validate` checks one made in Python, both raising a
:class:`ConfigError` naming the key; :func:`describe` renders ``--help-config``; :func:`add_flags` and
:func:`flag_values` derive argparse flags from the fields. A leaf: no torch, nothing of ``sparsebert``, so
``data_prep`` shares it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


class ConfigTypeError(ConfigError, TypeError):
    """A value of the wrong type: a :class:`ConfigError` that is also a ``TypeError``."""


def setting(
    default: Any,
    help: str,
    *,
    choices: Iterable[Any] | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    convert: Callable[[Any], Any] | None = None,
    cli: bool | dict[str, Any] = False,
    flag: str | None = None,
    metavar: str | None = None,
    group: str | None = None,
    sep: str | None = None,
    scale: int | None = None,
    exclusive: bool = False,
    **extra: Any,
) -> Any:
    """A documented field. Accepted values: ``choices`` (a list is read when a value is checked, so names
    registered later count); ``bounds`` (min, max), inclusive, None for no limit (a list's items are checked);
    ``convert`` turns what a user writes (YAML, a flag's words, a Python value) into the field's type first.

    A flag with ``cli`` (a dict adds ``add_argument`` keywords): ``flag`` (default ``--field-name``), ``metavar``,
    ``group`` (of ``--help``), ``sep`` (a list in one word: ``--lrs 2e-5,3e-5``; else several words), ``scale``
    (the flag counts units of it: ``--unit-mb``), ``exclusive`` (with the group's other exclusive flags).
    ``extra`` stays in the metadata for the schema's owner (``neutral``, ``manifest``)."""
    metadata = dict(help=help, choices=choices, bounds=bounds, convert=convert, cli=cli, flag=flag, metavar=metavar,
                    group=group, sep=sep, scale=scale, exclusive=exclusive, **extra)  # fmt: skip
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, *, flat: bool = False) -> Any:
    """A nested dataclass ``cls`` (with its defaults); ``flat``: its keys are written at this level, without the
    ``name.`` prefix (and are flags of the command line when its fields have them)."""
    return dataclasses.field(default_factory=cls, metadata={"flat": flat})


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` from ``data``, a mapping of its keys (sections nest, flat ones not), defaults for the
    rest. An unknown key, a wrong type, a value outside ``choices`` or ``bounds``: a :class:`ConfigError` naming
    the dotted key. Values as YAML writes them: ``"1e-4"`` (a string to YAML 1.1) is a float."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a section (mapping)")
    data, known = dict(data), _keys(cls)
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; known keys here: {', '.join(sorted(known))}"
        )
    hints, values = _hints(cls), {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and f.metadata.get("flat"):
            own = {key: data.pop(key) for key in _keys(hint) if key in data}
            if own:
                values[f.name] = build(hint, own, prefix)
        elif f.name in data and dataclasses.is_dataclass(hint):
            values[f.name] = build(hint, data.pop(f.name), f"{prefix}{f.name}.")
        elif f.name in data:
            values[f.name] = _checked(f"{prefix}{f.name}", f, hint, data.pop(f.name), lenient=True)
    return cls(**values)


def validate(obj: Any) -> None:
    """Check the fields of ``obj``, a dataclass made in Python, as :func:`build` does (call it from
    ``__post_init__``; ``"1e-4"`` is no float here). An int becomes a declared float, a list a declared tuple
    (frozen instances too); a section must be an instance of its dataclass, which checks itself."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigTypeError(f"config key {f.name!r} must be a {hint.__name__}, got {value!r}")
            continue
        checked = _checked(f.name, f, hint, value, lenient=False)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def describe(obj: Any, source: str | None = None) -> str:
    """Every key of the dataclass instance ``obj`` with its value and meaning, for ``--help-config``: the value
    marked where it differs from the default, the accepted names, the flag where there is one."""
    lines = [f"config: {source}" if source else "config: the built-in defaults"]
    for key, f, _, value in _leaves(type(obj), obj):
        default = default_of(f)
        differs = f"   (default: {default!r})" if value != default else ""
        allowed = f.metadata.get("choices")
        names = f" (one of: {', '.join(map(str, allowed))})" if allowed is not None else ""
        flag = f" [{_usage(f)}]" if f.metadata.get("cli") else ""
        lines.append(f"{key} = {value!r}{differs}\n    {f.metadata.get('help', '')}{names}{flag}")
    return "\n".join(lines)


def to_dict(obj: Any) -> dict[str, Any]:
    """The keys of the dataclass ``obj`` as :func:`build` reads them back (flat sections at their parent's level),
    in plain values for a YAML file or a record: tuples as lists, dataclasses as mappings."""
    out: dict[str, Any] = {}
    for key, _, _, value in _leaves(type(obj), obj):
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, tuple):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        node[leaf] = value
    return out


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def paths(value: Any) -> Any:
    """A ``convert`` for path settings: an ``os.PathLike``, or each of a list of them, as its string (anything else
    is left for the type check)."""
    if isinstance(value, (list, tuple)):
        return type(value)(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; a missing file, invalid YAML or anything but a mapping is a one-line
    :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` of ``overrides`` set in it (values are YAML: ``3e-4``, ``[1, 2]``,
    ``{name: star}``; nothing after ``=`` is null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: not a YAML value ({_one_line(err)})") from None
        *parents, leaf = key.strip().split(".")
        node = data
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parents[: i + 1])!r} is not a section")
        node[leaf] = value
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml`` and ``--help-config``, as every command line built on these settings has them."""
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="read the options from this YAML file (the keys --help-config lists); flags given override it",
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every option: its value with these flags (and --config), its meaning and its default",
    )


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: dict[str, Any] | None = None) -> None:
    """A flag per field of ``cls`` with ``cli`` (flat sections included), in its ``group`` (``groups``: those made
    so far, by name). A flag stores its words only when given (:func:`flag_values` types them): otherwise a
    config file's value or the default (which ``--help`` shows) stands."""
    groups = {} if groups is None else groups
    exclusive: dict[str, Any] = {}
    for _, f, hint, _ in _leaves(cls, None):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        target = parser
        if meta["group"] is not None:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
            if meta["exclusive"]:
                if meta["group"] not in exclusive:
                    exclusive[meta["group"]] = target.add_mutually_exclusive_group()
                target = exclusive[meta["group"]]
        target.add_argument(_flag(f), **_argument(f, hint))


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, by key, typed from their words (numbers parsed, ``sep`` lists split, ``scale`` applied,
    ``{...}`` read as a mapping) for :func:`build` to check; a bad word is a :class:`ConfigError` naming both."""
    given = vars(args)
    return {
        key: _from_words(_name(key, f), hint, given[f.name], f.metadata)
        for key, f, hint, _ in _leaves(cls, None)
        if f.metadata.get("cli") and f.name in given
    }


# --- internals -------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(cls: type) -> set[str]:
    """The keys written at the level of ``cls``: its fields, a flat section's keys in place of the section."""
    hints = _hints(cls)
    return {
        key
        for f in dataclasses.fields(cls)
        for key in (_keys(hints[f.name]) if f.metadata.get("flat") else {f.name})
    }


def _leaves(cls: type, obj: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted key, field, type, value) of every leaf field of ``cls``, in order; values from ``obj``, or the
    defaults when it is None."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        value = default_of(f) if obj is None else getattr(obj, f.name)
        if dataclasses.is_dataclass(hint):
            inner = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            yield from _leaves(hint, None if obj is None else value, inner)
        else:
            yield f"{prefix}{f.name}", f, hint, value


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _usage(f: dataclasses.Field) -> str:
    """The flag as ``--help-config`` shows it: both spellings of a switch that is on, a scaled flag's unit."""
    flag, meta = _flag(f), f.metadata
    if default_of(f) is True:
        return f"{flag} / --no-{flag[2:]}"
    return f"{flag} {meta['metavar']}" if meta.get("scale") and meta.get("metavar") else flag


def _name(key: str, f: dataclasses.Field) -> str:
    """How an error names a key: with its flag, where it has one."""
    return f"config key {key!r}" + (f" ({_flag(f)})" if f.metadata.get("cli") else "")


def _checked(key: str, f: dataclasses.Field, hint: Any, value: Any, *, lenient: bool) -> Any:
    """``value`` converted, typed and checked against the field's ``choices`` and ``bounds``."""
    name, meta = _name(key, f), f.metadata
    if meta.get("convert") is not None:
        try:
            value = meta["convert"](value)
        except TypeError as err:
            raise ConfigTypeError(f"{name}: {err}") from None
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
    for option in _options(hint):
        ok, typed = _as(option, value, lenient)
        if ok:
            break
    else:
        raise ConfigTypeError(f"{name} must be {_type_name(hint)}, got {value!r}")
    for item in typed if isinstance(typed, (list, tuple)) else [typed]:
        _check_value(name, item, meta)
    return typed


def _check_value(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    allowed = meta.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    low, high = meta.get("bounds") or (None, None)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"in [{low}, {high}]" if low is not None and high is not None else ""
        span = span or (f">= {low}" if low is not None else f"<= {high}")
        raise ConfigError(f"{name} must be {span}, got {value!r}")


def _options(hint: Any) -> tuple[Any, ...]:
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _as(option: Any, value: Any, lenient: bool) -> tuple[bool, Any]:
    """Whether ``value`` is of the type ``option`` (a bool is no number, an int is a float), and the value as
    that type."""
    origin = typing.get_origin(option) or option
    if option is type(None) or isinstance(value, bool) or origin is bool:
        return (value is None if option is type(None) else isinstance(value, bool) and origin is bool), value
    if origin is float:
        if isinstance(value, (int, float)) or (lenient and isinstance(value, str) and _is_float(value)):
            return True, float(value)
        return False, value
    if origin in (list, tuple) and typing.get_args(option):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = []
        for item in value:
            ok, typed = next(
                (r for o in _options(typing.get_args(option)[0]) if (r := _as(o, item, lenient))[0]),
                (False, item),
            )
            if not ok:
                return False, value
            items.append(typed)
        return True, origin(items)
    return isinstance(origin, type) and isinstance(value, origin), value


def _type_name(hint: Any) -> str:
    names = []
    for option in _options(hint):
        args = typing.get_args(option)
        if option is type(None):
            names.append("null")
        elif typing.get_origin(option) in (list, tuple) and args:
            names.append(f"a list of {_type_name(args[0])}")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field: its help (with the default, in the flag's unit) and how many words
    it takes. No ``type``: :func:`flag_values` types the words, so a bad one is the schema's one-line error."""
    meta, default = f.metadata, default_of(f)
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    kwargs["help"] = (meta["help"] + _default_text(f, default)).replace("%", "%%")
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    else:
        allowed, numbers = meta["choices"], {int, float} & set(_options(hint))
        kwargs["metavar"] = meta["metavar"] or (
            "{" + ",".join(allowed) + "}" if allowed else "N" if numbers else None
        )
        if allowed and meta["metavar"]:
            kwargs["help"] += f" (one of: {', '.join(allowed)})"
        if not meta["sep"] and any(typing.get_origin(o) in (list, tuple) for o in _options(hint)):
            kwargs["nargs"] = "+"
    if isinstance(meta["cli"], dict):
        kwargs |= meta["cli"]
    return kwargs


def _default_text(f: dataclasses.Field, default: Any) -> str:
    if default is True:
        return f" (default: {_flag(f)})"
    if default is None or default is False or default in ((), []):
        return ""
    scale, sep = f.metadata["scale"], f.metadata["sep"] or " "
    if scale:
        default = default / scale
    words = default if isinstance(default, (list, tuple)) else [default]
    return f" (default: {sep.join(f'{w:g}' if isinstance(w, float) else str(w) for w in words)})"


def _from_words(name: str, hint: Any, words: Any, meta: Mapping[str, Any]) -> Any:
    """A flag's value from the words argparse stored: one word, or a list of them (``nargs``)."""
    if not isinstance(words, (str, list)) or not all(isinstance(w, str) for w in words):
        return words  # a switch, or words grouped by an action (append) that the field's convert reads
    options = [o for o in _options(hint) if o is not type(None)]
    listed = next((o for o in options if typing.get_origin(o) in (list, tuple)), None)
    if listed is None:
        return _from_word(name, hint, options, words, meta["scale"])
    items = words.split(meta["sep"]) if isinstance(words, str) else words
    element = typing.get_args(listed)[0]
    return [_from_word(name, hint, _options(element), w.strip(), meta["scale"]) for w in items if w.strip()]


def _from_word(name: str, hint: Any, options: Iterable[Any], word: str, scale: int | None) -> Any:
    options = list(options)
    if dict in options and word.lstrip().startswith("{"):
        try:
            return yaml.safe_load(word)
        except yaml.YAMLError as err:
            raise ConfigError(f"{name}: {word!r} is not a mapping ({_one_line(err)})") from None
    for option in options:
        if option not in (int, float):
            return word  # text, or a type the field's convert reads from text
        try:
            return int(float(word) * scale) if scale else option(word)
        except ValueError:
            continue
    raise ConfigTypeError(f"{name} must be {_type_name(hint)}, got {word!r}")
