"""The docs are part of the contract: their ```python blocks run as written (```py blocks are fragments, ```bash
blocks are commands shown, not run), the pre-training commands they show load their configs, their links resolve,
and docs/config.md is what the config schema generates. README's own blocks run in tests/test_readme.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO as ROOT

from sparsebert import choices
from sparsebert.model import attention, masks
from sparsebert.train.config import DEFAULT_PRESET, load_config

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [*DOCS, ROOT / "CONTRIBUTING.md"]  # pages whose python blocks run here
LINKED = [
    ROOT / "README.md",
    *PAGES,
    ROOT / "cluster" / "MULTINODE.md",
]  # pages whose links and commands count


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def _prose(text: str) -> str:
    """The page without its fenced blocks (a `# comment` in a shell block is not a heading)."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)


PYTHON_BLOCKS = [
    (page, i, code) for page in PAGES for i, code in enumerate(_blocks(page.read_text(), "python"))
]


@pytest.fixture
def registries():
    """Examples register patterns, backends and tasks as a user would; later tests see the registries as they were."""
    from eval import tasks

    dicts = (masks._PATTERNS, attention._BACKENDS, tasks.TASKS)
    saved, names = [dict(d) for d in dicts], list(choices.ATTENTION_BACKENDS)
    yield
    for registry, before in zip(dicts, saved, strict=True):
        registry.clear()
        registry.update(before)
    choices.ATTENTION_BACKENDS[:] = names


@pytest.mark.parametrize(
    ("page", "index", "code"), PYTHON_BLOCKS, ids=[f"{_name(p)}:{i}" for p, i, _ in PYTHON_BLOCKS]
)
def test_docs_python_example_runs(page, index, code, tmp_path, monkeypatch, registries):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{_name(page)} python block {index}", "exec"), {"__name__": "docs_example"})


def _pretrain_commands() -> list[tuple[str, list[str]]]:
    """Every ``sparsebert/pretrain.py`` (or ``cluster/pretrain.sbatch``) command in a shell block, as its
    arguments: continuation lines joined, comments dropped, a command inside ``bash -c '...'`` included."""
    found = []
    for page in LINKED:
        for block in _blocks(page.read_text(), "bash"):
            for command in block.replace("\\\n", " ").splitlines():
                for match in re.finditer(
                    r"(?:sparsebert/pretrain\.py|cluster/pretrain\.sbatch)(?=\s|$)(.*)", command
                ):
                    args = shlex.split(match.group(1).strip(" '"), comments=True)
                    found.append((f"{_name(page)}: {command.strip()}", args))
    return found


PRETRAIN_COMMANDS = _pretrain_commands()


def test_the_docs_show_pretraining_commands():
    assert len(PRETRAIN_COMMANDS) >= 15, [c for c, _ in PRETRAIN_COMMANDS]


@pytest.mark.parametrize(
    ("command", "args"),
    PRETRAIN_COMMANDS,
    ids=[f"{c.split(':')[0]}:{i}" for i, (c, _) in enumerate(PRETRAIN_COMMANDS)],
)
def test_pretraining_commands_load_their_config(command, args):
    """What the command line would do first: the flags it knows, then the config, checked (no run starts)."""
    config, overrides, rest = DEFAULT_PRESET, [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--config":
            config = rest.pop(0)
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            assert arg in ("-v", "--verbose", "--help-config"), f"{command}: unknown argument {arg!r}"
    load_config(config, overrides)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), re.M)}


@pytest.mark.parametrize("page", LINKED, ids=_name)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {_name(resolved)}")
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


def test_every_docs_page_is_in_the_index_and_the_index_in_the_readme():
    index = (ROOT / "docs" / "README.md").read_text()
    assert [p.name for p in DOCS if p.name != "README.md" and f"]({p.name})" not in index] == []
    assert "](docs/README.md)" in (ROOT / "README.md").read_text()


def test_readme_fits_on_a_screen_or_two():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 220, f"README.md has {lines} lines: move the detail into a page of docs/"


def test_config_reference_is_generated_from_the_schema():
    spec = importlib.util.spec_from_file_location(
        "make_config_reference", ROOT / "docs" / "make_config_reference.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (ROOT / "docs" / "config.md").read_text() == generator.training_page(), (
        "docs/config.md is stale: regenerate it with `python docs/make_config_reference.py`"
    )


def test_license_is_the_apache_license_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
