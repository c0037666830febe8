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


BASE = (
    "sparsebert.choices",
    "sparsebert.console",
    "sparsebert.faults",
    "sparsebert.storage",
    "sparsebert.schema",
)

# One rule per package (docs/ARCHITECTURE.md, "Module map"): the package prefixes its modules may import, besides
# their own package. Below: base ← model ← track ← train ← pretrain; data ← train; eval and data_prep beside;
# study on top of train, track and eval.
LAYERS = {
    "sparsebert.model": (*BASE,),
    # data_prep.format: the shards' on-disk format, defined once where it is written
    "sparsebert.data": (*BASE, "data_prep.format"),
    "sparsebert.track": (*BASE, "sparsebert.model"),
    "sparsebert.train": (*BASE, "sparsebert.model", "sparsebert.data", "sparsebert.track", "data_prep"),
    "sparsebert.pretrain": ("sparsebert.console", "sparsebert.train"),
    "eval": (*BASE, "sparsebert.model", "sparsebert.track.mlflow_store", "sparsebert.train.recipe"),
    "data_prep": ("sparsebert.storage", "sparsebert.schema"),
    # the top layer: a study launches pre-trainings, evaluates their exports and reports (data_prep: its tasks' text)
    "sparsebert.study": (
        *BASE,
        "sparsebert.model",
        "sparsebert.track",
        "sparsebert.train",
        "eval",
        "data_prep",
    ),
}


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_package_imports_only_the_layers_below_it(package):
    allowed = (package, *LAYERS[package])
    broken = {
        module: sorted(t for t in targets if not _in(t, allowed))
        for module, targets in GRAPH.items()
        if _in(module, (package,))
    }
    broken = {module: targets for module, targets in broken.items() if targets}
    assert not broken, f"{package} may import only {sorted(LAYERS[package])}: {broken}"


@pytest.mark.parametrize(
    ("module", "may_import"),
    [
        ("sparsebert.model.masks", set()),  # the pattern library and its tensor helpers: a leaf
        ("sparsebert.model.layer_masks", set()),
        ("sparsebert.choices", set()),
        ("sparsebert.faults", set()),
        ("sparsebert.console", set()),
        ("sparsebert.train.recipe", set()),
        ("sparsebert.storage", set()),  # shared with data_prep: a leaf
        ("sparsebert.schema", set()),  # the config schemas of every entry point, data_prep's too: a leaf
        ("sparsebert.model.block_sparse", {"sparsebert.model.masks"}),
        ("sparsebert.model.flex_backend", {"sparsebert.model.masks", "sparsebert.model.layer_masks"}),
        ("sparsebert.model.dam", {"sparsebert.model.masks", "sparsebert.model.layer_masks"}),
    ],
)
def test_leaves_import_nothing_above_them(module, may_import):
    assert GRAPH[module] <= may_import, f"{module} imports {sorted(GRAPH[module] - may_import)}"


def test_no_module_sits_outside_the_layers():
    """A new module under sparsebert/ goes into a layer package (or the base) so that a rule above covers it."""
    stray = [m for m in GRAPH if m.startswith("sparsebert") and not _in(m, (*BASE, *LAYERS))]
    assert not stray, f"modules outside every layer: {stray}"


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
    from sparsebert import choices
    from sparsebert.model import attention
    from sparsebert.train import optim
    from sparsebert.train import recipe as training

    assert ["auto", *attention._BACKENDS] == choices.ATTENTION_BACKENDS
    assert set(optim.OPTIMIZERS) == set(choices.OPTIMIZERS)
    assert set(training.DECAYS) == set(choices.LR_DECAYS)
