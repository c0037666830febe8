"""The package's import structure (docs/ARCHITECTURE.md): no cycles, and the mask library is a leaf.

Imports are read from the source (``ast``), lazy ones inside functions included: a cycle hidden in a function
body is still a cycle a newcomer trips over.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO as ROOT

from sparsebert.model.standalone import SHIPPED_BASE

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
# their own package. Below: base ← model ← track ← export ← train ← pretrain; data ← train; eval and data_prep beside;
# study on top of train, track and eval.
LAYERS = {
    # The model code is what a standalone export ships (sparsebert.model.standalone): of the base, only the leaves
    # the export ships with it.
    "sparsebert.model": SHIPPED_BASE,
    # data_prep.format: the shards' on-disk format, defined once where it is written
    "sparsebert.data": (*BASE, "data_prep.format"),
    "sparsebert.track": (*BASE, "sparsebert.model"),
    "sparsebert.export": (*BASE, "sparsebert.model", "sparsebert.track.mask_plots"),
    "sparsebert.train": (
        *BASE,
        "sparsebert.model",
        "sparsebert.data",
        "sparsebert.track",
        "sparsebert.export",
        "data_prep",
    ),
    "sparsebert.pretrain": ("sparsebert.console", "sparsebert.train"),
    "eval": (
        *BASE,
        "sparsebert.model",
        "sparsebert.track.mlflow_store",
        "sparsebert.train.recipe",
        "sparsebert.export",
    ),
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
        ("sparsebert.model.dam_logits", set()),  # DAM's tensor helpers: a leaf
        ("sparsebert.model.masks", {"sparsebert.model.dam_logits"}),  # the pattern library (offers them too)
        ("sparsebert.model.layer_masks", set()),
        ("sparsebert.choices", set()),
        ("sparsebert.faults", set()),
        ("sparsebert.console", set()),
        ("sparsebert.train.recipe", set()),
        ("sparsebert.storage", set()),  # shared with data_prep: a leaf
        ("sparsebert.schema", set()),  # the config schemas of every entry point, data_prep's too: a leaf
        ("sparsebert.model.block_sparse", {"sparsebert.model.masks"}),
        ("sparsebert.model.flex_backend", {"sparsebert.model.masks", "sparsebert.model.layer_masks"}),
        (
            "sparsebert.model.dam",
            {"sparsebert.model.masks", "sparsebert.model.layer_masks", "sparsebert.model.dam_logits"},
        ),
        ("sparsebert.model.standalone", set()),  # reads the model modules as text, never imports them
        ("sparsebert.model.registration", set()),  # torch-free: `import sparsebert` runs it
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


def _third_party(path: Path) -> set[str]:
    """The top-level names of every package ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return {name.split(".")[0] for name in imported}


def test_the_schema_needs_no_torch():
    """Every entry point reads its settings through ``sparsebert.schema`` before anything heavy is imported."""
    heavy = _third_party(ROOT / "sparsebert" / "schema.py") & {"torch", "transformers", "numpy", "ray"}
    assert not heavy


def test_choice_names_need_no_torch():
    """Config validation and command lines read the registered names without importing torch."""
    assert not _third_party(ROOT / "sparsebert" / "choices.py") & {"torch", "transformers", "numpy"}


def test_every_registry_matches_its_names():
    """A name a config may choose has an implementation, and an implementation has a name to choose it by."""
    from sparsebert import choices
    from sparsebert.model import attention
    from sparsebert.train import optim
    from sparsebert.train import recipe as training

    assert ["auto", *attention._BACKENDS] == choices.ATTENTION_BACKENDS
    assert set(optim.OPTIMIZERS) == set(choices.OPTIMIZERS)
    assert set(training.DECAYS) == set(choices.LR_DECAYS)


MAX_FUNCTION_LINES = 60
# Everything but benchmarks/ (measurement scripts, kept whole so that each reads as one experiment).
SOURCE_DIRS = (*PACKAGES, "tests", "cluster", "docs")


def test_no_function_is_longer_than_sixty_lines():
    """A function (a test included) that fits on a screen: a longer one is split into named steps."""
    paths = [*ROOT.glob("*.py"), *(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))]
    long = [
        f"{path.relative_to(ROOT)}:{node.name}:{node.end_lineno - node.lineno + 1}"
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (file:function:lines): {long}"


def test_model_modules_import_the_package_in_the_form_the_export_ships():
    """transformers' dynamic-module loader copies a shipped module's neighbours by following ``from .x import``
    lines only, so model code imports package modules as ``from sparsebert.<module> import <names>`` (which the
    standalone export rewrites into that form), never ``from sparsebert.model import x`` or ``import sparsebert``."""
    bad = []
    for path in sorted((ROOT / "sparsebert" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad += [
                    f"{path.name}:{node.lineno}" for a in node.names if a.name.split(".")[0] == "sparsebert"
                ]
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("sparsebert")
            ):
                target = ROOT.joinpath(*node.module.split(".")).with_suffix(".py")
                if not target.is_file():
                    bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"package imports the standalone export cannot ship: {bad}"


def test_the_shipped_model_code_needs_torch_and_transformers_only():
    """What a standalone export ships imports the standard library, torch and transformers, and its own files."""
    import sys

    from sparsebert.model.standalone import shipped_sources

    sources = shipped_sources()
    assert {
        "sparsebert_modeling.py",
        "sparsebert_masks.py",
        "sparsebert_dam.py",
        "sparsebert_choices.py",
    } <= set(sources)
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert f"{node.module}.py" in sources, (
                        f"{name} imports .{node.module}, which is not shipped"
                    )
                    continue
                modules = [node.module]
            assert {m.split(".")[0] for m in modules} <= allowed, f"{name} imports {modules}"
