"""What the GPU run imports, and whether the GPU image plus the bundle's wheels provide all of it.

Used by benchmarks/check_bundle.py (its part (a)) on a built bundle, and by tests/test_gpu_bundle.py offline,
with the carried packages' metadata read from this environment instead of from the wheels.

What a GPU run imports is found in two steps, so that no lazy import hides a dependency:

1. A subprocess imports the GPU entry points (``GPU_ENTRY_MODULES``) and runs the module-level code of the
   scripts ``benchmarks/gpu_check.sh`` runs (``GPU_SCRIPTS``), then reports every project module it loaded,
   however it was loaded (``importlib``, a package's ``__getattr__``).
2. Every import statement of those modules is read, function bodies included (``pretrain.main`` imports the
   trainer, ``eval.metrics`` imports sklearn when a metric is computed); a project module imported only inside
   a function is read the same way. Imports under ``if TYPE_CHECKING:`` never run and optional ones (in a
   ``try`` that catches ImportError) are skipped.

A third-party package found this way must be carried or in the GPU image (benchmarks/gpu_image_packages.txt);
the carried wheels' own requirements are followed through their Requires-Dist. The only exceptions are the
packages of ``NOT_ON_GPU``, and only where they are imported inside a function: a module-level import runs
whenever its module is imported.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LIST = ROOT / "benchmarks" / "gpu_image_packages.txt"
BUNDLE_LIST = ROOT / "benchmarks" / "gpu_bundle_packages.txt"

# What a GPU run imports (benchmarks/gpu_check.sh and gpu_e2e.sh). Not eval.run / eval.runner (the Ray driver,
# with MLflow) nor data_prep's pipeline (Ray): the bundle carries their output, not them.
GPU_ENTRY_MODULES = (
    "sparsebert.pretrain",  # the script the deepspeed launcher runs...
    "sparsebert.train.trainer",  # ...and the run its main() imports
    "sparsebert.model.modeling",  # the export gpu_e2e.sh loads (the package's public names load it lazily)
    "eval.finetune",  # fine-tuning jobs, run in-process there (run_job)
    "eval.jobs",
)
GPU_SCRIPTS = (
    "benchmarks/gpu_sanity.py",
    "benchmarks/bench_training.py",
    "benchmarks/bench_attention.py",
    "benchmarks/bench_auto_short.py",
    "benchmarks/bench_pretrain_long.py",
)
# Imported only inside functions a GPU run does not call; none of them is in the GPU image.
NOT_ON_GPU = {
    "ray": "eval.finetune names Ray's GPU ids in an error only when Ray runs the job (it does not there)",
    "mlflow": "run tracking, off there (mlflow.enabled=false)",
    "datasets": "Hugging Face hub datasets (the GPU machine reaches no hub; the bundle carries the tasks)",
}

GPU_PYTHON = "3.12.3"
# PEP 508 marker environment of the GPU machine's /opt/torch/.venv/bin/python3.
GPU_MARKERS = {
    "implementation_name": "cpython",
    "implementation_version": GPU_PYTHON,
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": GPU_PYTHON,
    "python_version": "3.12",
    "sys_platform": "linux",
    "extra": "",  # no extras asked for: every `extra == ...` requirement evaluates false
}
# Versions seen in the GPU image (/work/.library/device/KINDS.md, its 'pip list, as a session saw it' row,
# 2026-11); the rest of the image's packages have no known version, so only their presence is checked.
IMAGE_VERSIONS_SEEN = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.2",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}


@dataclass
class Carried:
    """A package the bundle carries: from its wheel (check_bundle.py) or from this environment (the test)."""

    name: str  # normalised
    version: Version
    requires: list[Requirement]
    source: str  # the wheel's file name, or where the metadata was read
    size: int | None = None  # bytes of the wheel
    needed_by: list[str] = field(default_factory=list)  # why it is carried


@dataclass(frozen=True)
class Importer:
    path: str  # project file, relative to the repository
    line: int
    lazy: bool  # not run by importing the module: inside a function, or only reached through such an import

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" + (" (lazily)" if self.lazy else "")


def read_list(path: Path) -> list[str]:
    """Normalised package names, one a line, ``#`` comments and blank lines aside."""
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [canonicalize_name(n) for n in names if n]


def read_image_packages(path: Path = IMAGE_LIST) -> set[str]:
    return set(read_list(path))


def carried_from_installed(names: list[str]) -> list[Carried]:
    """The carried packages as installed here: gpu_bundle.sh carries these very versions."""
    carried = []
    for name in names:
        dist = md.distribution(name)
        carried.append(
            Carried(
                name=canonicalize_name(name),
                version=Version(dist.version),
                requires=[Requirement(r) for r in dist.requires or []],
                source=f"{name} {dist.version} as installed here",
            )
        )
    return carried


# ------------------------------------------------------------------- what the project's GPU run imports

_RECORD = """
import importlib, json, os, runpy, sys
root, entries, scripts = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
for name in entries:
    importlib.import_module(name)
for path in scripts:
    sys.path.insert(0, os.path.dirname(path))  # as `python path/script.py` does
    runpy.run_path(path, run_name="__gpu_closure__")  # module level only: main() does not run
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
print(json.dumps({n: f for n, f in files.items() if f and f.startswith(root + os.sep) and "site-packages" not in f}))
"""


def loaded_project_modules() -> dict[str, Path]:
    """Project modules loaded by importing the GPU entry points and the GPU scripts' module level, in a fresh
    interpreter. Raises RuntimeError, with the error, if that fails."""
    scripts = [str(ROOT / s) for s in GPU_SCRIPTS]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", _RECORD, str(ROOT), ",".join(GPU_ENTRY_MODULES), ",".join(scripts)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"importing the GPU entry points failed: {last}")
    return {name: Path(f) for name, f in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _guards_import_errors(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        if handler.type is None:
            return True
        for t in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
            names.add(ast.unparse(t))
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _imports(tree: ast.Module, module: str, is_package: bool):
    """(absolute module name, names imported from it, line, inside a function or a __main__ block) for every
    import statement that can run."""
    package = module if is_package else module.rpartition(".")[0]

    def walk(body, lazy: bool):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(node.body, True)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, (), node.lineno, lazy
            elif isinstance(node, ast.ImportFrom):
                name = node.module
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    name = f"{base}.{node.module}" if node.module else base
                yield name, tuple(a.name for a in node.names), node.lineno, lazy
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse, lazy)
            elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                yield from walk(node.body, True)
                yield from walk(node.orelse, lazy)
            elif isinstance(node, ast.Try) and _guards_import_errors(node):
                yield from walk(node.orelse, lazy)
                yield from walk(node.finalbody, lazy)
            else:
                for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
                    sub = getattr(node, attr, None)
                    if isinstance(sub, list):
                        yield from walk(sub, lazy)

    yield from walk(tree.body, False)


def _project_file(module: str) -> Path | None:
    """The project file of ``module``: a package module, or a benchmark module the scripts import by name."""
    for base in (ROOT, ROOT / "benchmarks"):
        stem = base.joinpath(*module.split("."))
        for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def gpu_imports(loaded: dict[str, Path] | None = None) -> dict[str, list[Importer]]:
    """Third-party top-level module -> every project import of it a GPU run can execute."""
    loaded = loaded_project_modules() if loaded is None else loaded
    todo = [(name, path, False) for name, path in sorted(loaded.items())]
    todo += [(Path(s).stem, ROOT / s, False) for s in GPU_SCRIPTS]
    done: set[Path] = set()
    found: dict[str, list[Importer]] = defaultdict(list)
    while todo:
        module, path, not_loaded = todo.pop(0)
        if path in done:
            continue
        done.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported, names, line, lazy in _imports(tree, module, path.name == "__init__.py"):
            lazy = lazy or not_loaded
            top = imported.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            targets = [imported, *(f"{imported}.{n}" for n in names)]
            project = [(t, f) for t in targets if (f := _project_file(t)) is not None]
            if project:  # parents first, as the import system does
                parts = imported.split(".")
                parents = [
                    (p, f) for i in range(1, len(parts)) if (f := _project_file(p := ".".join(parts[:i])))
                ]
                # A module the subprocess loaded ran its module level; any other is reached lazily only.
                todo += [(t, f, t not in loaded) for t, f in parents + project]
            else:
                found[top].append(Importer(str(path.relative_to(ROOT)), line, lazy))
    return {top: sorted(found[top], key=lambda i: (i.lazy, i.path, i.line)) for top in sorted(found)}


# ---------------------------------------------------------------------------------------------- closure


def closure_problems(
    carried: list[Carried], image: set[str], imports: dict[str, list[Importer]], verbose: bool = True
) -> list[str]:
    """Every problem with the closure of ``imports`` over ``carried`` + ``image`` (and, if verbose, a report)."""
    problems: list[str] = []
    wheels = {c.name: c for c in carried}
    from_image: dict[str, list[str]] = defaultdict(list)  # image package -> who needs it (and which versions)

    def need(name: str, spec: SpecifierSet, why: str) -> bool:
        """Record that ``why`` needs ``name`` (spec); True the first time a carried package is reached."""
        spec_text = f" {spec}" if str(spec) else ""
        if name in wheels:
            w = wheels[name]
            first = not w.needed_by
            w.needed_by.append(f"{why}{spec_text}")
            if not spec.contains(w.version, prereleases=True):
                problems.append(f"{why} needs {name}{spec}, the bundle carries {w.version}")
            return first
        if name in image:
            seen = IMAGE_VERSIONS_SEEN.get(name)
            from_image[name].append(f"{why}{spec_text}")
            if seen and not spec.contains(seen, prereleases=True):
                problems.append(f"{why} needs {name}{spec}, the image was seen with {seen}: carry {name}")
            return False
        problems.append(f"{why} needs {name}{spec_text}: neither carried nor in the GPU image")
        return False

    # A module name maps to its distribution(s) through this environment's metadata (the project is
    # installed here with all its dependencies).
    module_to_dists = md.packages_distributions()
    todo: list[Carried] = []
    off_gpu: dict[str, list[Importer]] = {}
    for module, importers in sorted(imports.items()):
        if module in NOT_ON_GPU:
            definite = [i for i in importers if not i.lazy]
            off_gpu[module] = importers
            if not definite:
                continue
            importers = definite  # imported whenever its module is: the GPU run needs it after all
        first = importers[0]
        dists = sorted({canonicalize_name(d) for d in module_to_dists.get(module, [])})
        if not dists:
            problems.append(f"{first} imports {module}, which no package installed here provides")
            continue
        # A module several distributions provide (mlflow: mlflow, mlflow-skinny, ...) is met by any of them.
        chosen = next((d for d in dists if d in wheels), next((d for d in dists if d in image), dists[0]))
        if need(chosen, SpecifierSet(), f"{first} (import {module})"):
            todo.append(wheels[chosen])
    while todo:
        w = todo.pop()
        for req in w.requires:
            if req.marker is not None and not req.marker.evaluate(GPU_MARKERS):
                continue
            name = canonicalize_name(req.name)
            if need(name, req.specifier, f"{w.name} {w.version}") and name in wheels:
                todo.append(wheels[name])
    problems += [
        f"{w.source} is carried but nothing the GPU run imports needs it" for w in carried if not w.needed_by
    ]
    problems += [
        f"NOT_ON_GPU names {name}, which nothing the GPU run reaches imports: drop it"
        for name in sorted(set(NOT_ON_GPU) - set(off_gpu))
    ]
    if verbose:
        _report(carried, image, from_image, off_gpu)
    return problems


def _report(carried: list[Carried], image: set[str], from_image: dict, off_gpu: dict) -> None:
    print(
        f"(a) dependency closure for CPython {GPU_PYTHON} on Linux x86_64, of what the GPU run imports "
        f"({', '.join(GPU_ENTRY_MODULES)}, {', '.join(Path(s).name for s in GPU_SCRIPTS)}, and the project "
        f"modules they import, in functions too); GPU image: {IMAGE_LIST.relative_to(ROOT)} ({len(image)} packages)"
    )
    rows = [("carried", "version", "size", "why")]
    for w in sorted(carried, key=lambda w: w.name):
        why = "; ".join(w.needed_by) or "NOTHING NEEDS IT"
        if w.name in image:
            why += "; the image has it too, version unknown: this one shadows it"
        size = "—" if w.size is None else f"{w.size / 1024:,.0f} KiB"
        rows.append((w.name, str(w.version), size, why))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"    {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    print("    met by the image (version seen there, if any, in []):")
    for name in sorted(from_image):
        seen = f" [{IMAGE_VERSIONS_SEEN[name]}]" if name in IMAGE_VERSIONS_SEEN else ""
        print(f"      {name}{seen} <- {', '.join(sorted(set(from_image[name])))}")
    print("    imported only on paths the GPU run does not take:")
    for name, importers in sorted(off_gpu.items()):
        print(f"      {name} <- {', '.join(map(str, importers))}: {NOT_ON_GPU[name]}")
