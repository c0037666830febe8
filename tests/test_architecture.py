"""The package's import structure (docs/ARCHITECTURE.md): no cycles, and the mask library is a leaf.

Imports are read from the source (``ast``), lazy ones inside functions included: a cycle hidden in a function
body is still a cycle a newcomer trips over.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sparsebert", "eval", "data_prep")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from package import module`` counts as the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports that module; `from module import name`, the module
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    """Module → the project modules it imports. Importing through a package's ``__init__`` (``from sparsebert
    import sparsity``) counts as importing what that ``__init__`` re-exports from."""
    paths = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p) for p in paths}
    inits = {_module_name(p) for p in paths if p.name == "__init__.py"}
    direct = {_module_name(p): _imports(p, modules) for p in paths}
    return {
        module: {t for target in targets for t in (direct[target] if target in inits else {target})}
        - {module}
        for module, targets in direct.items()
        if module not in inits
    }


GRAPH = _graph()


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    cycles = sorted(module for module in GRAPH if module in _reachable(module))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize(
    ("module", "may_import"),
    [
        ("sparsebert.masks", set()),  # the pattern library and its tensor helpers: a leaf
        ("sparsebert.layer_masks", set()),
        ("sparsebert.choices", set()),
        ("sparsebert.faults", set()),
        ("sparsebert.training", set()),
        ("sparsebert.storage", set()),  # shared with data_prep: a leaf
        ("sparsebert.schema", set()),  # the config schemas of every entry point, data_prep's too: a leaf
        ("sparsebert.block_sparse", {"sparsebert.masks"}),
        ("sparsebert.flex_backend", {"sparsebert.masks", "sparsebert.layer_masks"}),
        ("sparsebert.dam", {"sparsebert.masks", "sparsebert.layer_masks"}),
    ],
)
def test_lower_layers_import_nothing_above_them(module, may_import):
    assert GRAPH[module] <= may_import, f"{module} imports {sorted(GRAPH[module] - may_import)}"


def test_data_prep_uses_only_the_storage_and_schema_leaves_of_sparsebert():
    """Corpus preparation shares where data lives (``sparsebert.storage``) and how settings are declared
    (``sparsebert.schema``), and nothing else of the package."""
    for module, targets in GRAPH.items():
        if module.startswith("data_prep"):
            used = {t for t in targets if t.startswith("sparsebert")}
            assert used <= {"sparsebert.storage", "sparsebert.schema"}, f"{module} imports {sorted(used)}"


def test_the_schema_needs_no_torch():
    """Every entry point reads its settings through ``sparsebert.schema`` before anything heavy is imported."""
    tree = ast.parse((ROOT / "sparsebert" / "schema.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "numpy", "ray")}


def test_choice_names_need_no_torch():
    """Config validation and command lines read the registered names without importing torch."""
    tree = ast.parse((ROOT / "sparsebert" / "choices.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "transformers", "numpy")}


def test_every_registry_matches_its_names():
    """A name a config may choose has an implementation, and an implementation has a name to choose it by."""
    from sparsebert import attention, choices, optim, training

    assert ["auto", *attention._BACKENDS] == choices.ATTENTION_BACKENDS
    assert set(optim.OPTIMIZERS) == set(choices.OPTIMIZERS)
    assert set(training.DECAYS) == set(choices.LR_DECAYS)
