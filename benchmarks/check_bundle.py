"""Rehearse, on this CPU machine, what the GPU machine does with the bundle benchmarks/gpu_bundle.sh builds.

    python benchmarks/check_bundle.py [--bundle .gpu_bundle] [--python312 PATH]

(a) Dependency closure, for CPython 3.12 on Linux x86_64 (the GPU machine's Python): the third-party
    packages that the GPU entry points (sparsebert, sparsebert.pretrain, eval.finetune) import at module
    level, followed through every carried wheel's Requires-Dist (markers evaluated, ``extra ==`` ones
    skipped), must each be a carried wheel or in the GPU image (benchmarks/gpu_image_packages.txt). Also
    fails on: a package carried twice, a carried version its dependants exclude, a wheel that does not install
    on CPython 3.12 manylinux x86_64, a wheel nothing needs, and a deepspeed wheel with prebuilt ops.
(b) Install rehearsal: the GPU machine's pip command, run with a Python 3.12 here (pyenv's) into a fresh
    directory, then the pure-Python packages that need no torch are imported from it.
(c) Contents: the bundle's size (under --max-mib), corpus/manifest.json and its shards, tasks/glue and
    tasks/squad.

Exits non-zero naming every problem found.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
IMAGE_LIST = ROOT / "benchmarks" / "gpu_image_packages.txt"
# What a GPU run imports: the package, pre-training and a fine-tuning job. Not eval.run / eval.runner (the Ray
# driver, with MLflow) nor data_prep's pipeline (Ray): the bundle carries their output, not them.
ENTRY_MODULES = ("sparsebert", "sparsebert.pretrain", "eval.finetune")
PROJECT_PACKAGES = {"sparsebert", "eval", "data_prep"}

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
MAX_GLIBC_MINOR = 28  # the newest manylinux_2_N the bundle's `pip download --platform` flags accept
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
TORCH_FREE_IMPORTS = (
    "hjson",
    "pydantic",
    "pydantic_core",
    "typing_extensions",
    "typing_inspection",
    "annotated_types",
)
GLUE_TASKS = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")
MIB = 1 << 20


@dataclass
class Wheel:
    path: Path
    name: str  # normalised
    version: Version
    requires_python: str | None
    requires: list[Requirement]
    needed_by: list[str] = field(default_factory=list)  # why it is carried


def read_image_packages(path: Path = IMAGE_LIST) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def read_wheel(path: Path) -> Wheel:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        metadata = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(metadata) != 1:
            raise ValueError(f"{path.name}: {len(metadata)} .dist-info/METADATA files")
        meta = HeaderParser().parsestr(zf.read(metadata[0]).decode("utf-8"))
    return Wheel(
        path=path,
        name=canonicalize_name(name),
        version=version,
        requires_python=meta.get("Requires-Python"),
        requires=[Requirement(r) for r in meta.get_all("Requires-Dist") or []],
    )


def installs_on_gpu(path: Path) -> bool:
    """Whether one of the wheel's tags fits CPython 3.12 on manylinux (glibc <= 2.MAX_GLIBC_MINOR) x86_64."""
    for tag in parse_wheel_filename(path.name)[3]:
        interpreter_ok = tag.interpreter in ("py3", "py312", "cp312") or (
            tag.abi == "abi3" and re.fullmatch(r"cp3(\d+)", tag.interpreter) is not None
            and int(tag.interpreter[3:]) <= 12
        )  # fmt: skip
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        m = re.fullmatch(r"manylinux_2_(\d+)_x86_64", tag.platform)
        platform_ok = (
            tag.platform == "any"
            or tag.platform in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64")
            or (m is not None and int(m.group(1)) <= MAX_GLIBC_MINOR)
        )
        if interpreter_ok and abi_ok and platform_ok:
            return True
    return False


def wheel_contents_problems(w: Wheel) -> list[str]:
    """A pure (py3-none-any) wheel holds no compiled code; the deepspeed wheel has no op prebuilt."""
    problems = []
    with zipfile.ZipFile(w.path) as zf:
        names = zf.namelist()
        pure = all(t.abi == "none" and t.platform == "any" for t in parse_wheel_filename(w.path.name)[3])
        compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib")) or ".so." in n]
        if pure and compiled:
            problems.append(f"{w.path.name} is tagged pure Python but holds compiled files: {compiled[:3]}")
        if w.name == "deepspeed":
            info = "deepspeed/git_version_info_installed.py"
            if info not in names:
                problems.append(f"{w.path.name}: no {info}, cannot tell which ops were prebuilt")
            else:
                tree = ast.parse(zf.read(info).decode())
                ops = {
                    t.id: ast.literal_eval(node.value)
                    for node in tree.body
                    if isinstance(node, ast.Assign)
                    for t in node.targets
                    if isinstance(t, ast.Name)
                }.get("installed_ops", {})
                prebuilt = sorted(op for op, built in ops.items() if built)
                if prebuilt or compiled:
                    problems.append(
                        f"{w.path.name} has prebuilt ops {prebuilt or compiled[:3]}: "
                        "build it with DS_BUILD_OPS=0"
                    )
    return problems


# ---------------------------------------------------------------- what the project's GPU entry points import


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guards_import_errors(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        if handler.type is None:
            return True
        for t in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
            names.add(ast.unparse(t))
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _module_level_imports(tree: ast.Module, module: str, is_package: bool):
    """Absolute module names imported when the module is imported (function bodies and optional imports
    aside), with the names imported from each (a `from pkg import mod` may import a submodule)."""
    package = module if is_package else module.rpartition(".")[0]

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, ()
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module
                yield name, tuple(a.name for a in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try) and _guards_import_errors(node):
                yield from walk(node.orelse)
                yield from walk(node.finalbody)
            else:
                for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
                    sub = getattr(node, attr, None)
                    if isinstance(sub, list):
                        yield from walk(sub)

    yield from walk(tree.body)


def third_party_imports(entries=ENTRY_MODULES) -> dict[str, str]:
    """Top-level third-party module name -> the first project file that imports it, following the project's
    own modules from ``entries`` (and the packages above each module, which Python imports first)."""
    seen: set[str] = set()
    todo = list(entries)
    found: dict[str, str] = {}
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # parents first, as the import system does
            name = ".".join(parts[:i])
            if name in seen:
                continue
            seen.add(name)
            path = _module_file(name)
            if path is None:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for imported, names in _module_level_imports(tree, name, path.name == "__init__.py"):
                top = imported.split(".")[0]
                if top in PROJECT_PACKAGES:
                    todo.append(imported)
                    todo.extend(f"{imported}.{n}" for n in names if _module_file(f"{imported}.{n}"))
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


# ---------------------------------------------------------------------------------------------- (a) closure


def check_closure(wheels_dir: Path, image: set[str]) -> list[str]:
    problems: list[str] = []
    wheels: dict[str, Wheel] = {}
    paths = sorted(wheels_dir.glob("*.whl"))
    if not paths:
        return [f"no wheels in {wheels_dir}"]
    for path in paths:
        w = read_wheel(path)
        if w.name in wheels:
            problems.append(f"{w.name} is carried twice: {wheels[w.name].path.name} and {path.name}")
            continue
        wheels[w.name] = w
        if not installs_on_gpu(path):
            problems.append(f"{path.name} does not install on CPython 3.12 manylinux x86_64")
        if w.requires_python and not SpecifierSet(w.requires_python).contains(GPU_PYTHON, prereleases=True):
            problems.append(f"{path.name} requires Python {w.requires_python}, the GPU has {GPU_PYTHON}")
        problems += wheel_contents_problems(w)

    from_image: dict[str, list[str]] = defaultdict(list)  # image package -> who needs it (and which versions)

    def need(name: str, spec: SpecifierSet, why: str) -> bool:
        """Record that ``why`` needs ``name`` (spec); True the first time a carried wheel is reached."""
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

    # Roots: what the GPU entry points import. A module name maps to its distribution(s) through this
    # environment's metadata (the project is installed here with all its dependencies).
    module_to_dists = md.packages_distributions()
    todo: list[Wheel] = []
    for module, importer in sorted(third_party_imports().items()):
        dists = sorted({canonicalize_name(d) for d in module_to_dists.get(module, [])})
        if not dists:
            problems.append(f"{importer} imports {module}, which no package installed here provides")
            continue
        # A module several distributions provide (mlflow: mlflow, mlflow-skinny, ...) is met by any of them.
        chosen = next((d for d in dists if d in wheels), next((d for d in dists if d in image), dists[0]))
        if need(chosen, SpecifierSet(), f"{importer} (import {module})"):
            todo.append(wheels[chosen])
    while todo:
        w = todo.pop()
        for req in w.requires:
            if req.marker is not None and not req.marker.evaluate(GPU_MARKERS):
                continue
            name = canonicalize_name(req.name)
            if need(name, req.specifier, f"{w.name} {w.version}") and name in wheels:
                todo.append(wheels[name])

    print(
        f"(a) dependency closure for CPython {GPU_PYTHON} on Linux x86_64, from the GPU entry points "
        f"{', '.join(ENTRY_MODULES)}; GPU image: {IMAGE_LIST.relative_to(ROOT)} ({len(image)} packages)"
    )
    rows = [("carried", "version", "size", "why")]
    for w in sorted(wheels.values(), key=lambda w: w.name):
        why = "; ".join(w.needed_by) or "NOTHING NEEDS IT"
        if w.name in image:
            why += "; the image has it too, version unknown: this one shadows it"
        rows.append((w.name, str(w.version), f"{w.path.stat().st_size / 1024:,.0f} KiB", why))
        if not w.needed_by:
            problems.append(f"{w.path.name} is carried but nothing the GPU run imports needs it")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"    {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    print("    met by the image (version seen there, if any, in []):")
    for name in sorted(from_image):
        seen = f" [{IMAGE_VERSIONS_SEEN[name]}]" if name in IMAGE_VERSIONS_SEEN else ""
        print(f"      {name}{seen} <- {', '.join(sorted(set(from_image[name])))}")
    return problems


# ------------------------------------------------------------------------------------------ (b) install


def find_python312(explicit: str | None) -> str | None:
    """The first working CPython 3.12 of: --python312, $PYTHON312, pyenv's 3.12.x, python3.12 on PATH (pyenv's
    shims there may name a version that is not selected, so each candidate is asked its version)."""
    candidates = [explicit, os.environ.get("PYTHON312")]
    candidates += sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True
    )
    candidates.append(shutil.which("python3.12"))
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        probe = [c, "-c", "import sys; print(sys.implementation.name, *sys.version_info[:2])"]
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.split() == ["cpython", "3", "12"]:
            return c
    return None


_IMPORT_CHECK = """
import importlib.metadata as md, importlib.util, json, sys
site = sys.argv[1]
mods = {}
for name in sys.argv[2].split(","):
    mod = __import__(name)
    assert mod.__file__.startswith(site), f"{name} imported from {mod.__file__}, not {site}"
    mods[name] = mod
class Probe(mods["pydantic"].BaseModel):
    n: int
assert Probe(n="3").n == 3  # pydantic_core's compiled validator runs
assert mods["hjson"].loads("{a: 1}") == {"a": 1}
for name in ("deepspeed", "pytorch_optimizer"):  # need torch to import: only located
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin.startswith(site), f"{name} not installed in {site}"
print(json.dumps({
    "python": sys.version.split()[0],
    "imported": {n: getattr(m, "__version__", getattr(m, "VERSION", "")) for n, m in mods.items()},
    "installed": {d.metadata["Name"]: d.version for d in md.distributions(path=[site])},
}, default=str))
"""


def check_install(wheels_dir: Path, python312: str | None) -> list[str]:
    print(f"(b) install rehearsal with {python312 or 'no Python 3.12'}")
    if python312 is None:
        return ["no Python 3.12 found (give --python312 PATH; pyenv has one here: ~/.pyenv/versions/3.12.*)"]
    wheels = sorted(wheels_dir.glob("*.whl"))
    # A bare pip, as on the GPU machine: none of this machine's pip configuration (find-links, indexes).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    with tempfile.TemporaryDirectory(prefix="gpu_site-") as site:
        pip = [
            python312,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
        ]
        cmd = [*pip, "--upgrade", "--target", site, *map(str, wheels)]
        print(f"    $ {shlex.join(cmd[: len(pip) + 3])} {wheels_dir}/*.whl")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout + done.stderr)
            return [f"pip install of the wheels with {python312} failed (exit {done.returncode})"]
        check = [python312, "-c", _IMPORT_CHECK, site, ",".join(TORCH_FREE_IMPORTS)]
        done = subprocess.run(check, env=env | {"PYTHONPATH": site}, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout + done.stderr)
            return [f"importing {', '.join(TORCH_FREE_IMPORTS)} from the install failed"]
        report = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"    installed, Python {report['python']}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["installed"].items()))
    )
    print(
        f"    imported from it: {', '.join(report['imported'])}; "
        "deepspeed and pytorch_optimizer located (they need torch)"
    )
    expected = {
        canonicalize_name(parse_wheel_filename(p.name)[0]): str(parse_wheel_filename(p.name)[1])
        for p in wheels
    }
    got = {canonicalize_name(k): v for k, v in report["installed"].items()}
    return [f"installed {got} differs from the wheels {expected}"] if got != expected else []


# ---------------------------------------------------------------------------------------- (c) contents


def check_contents(bundle: Path, max_mib: float) -> list[str]:
    problems = []
    files = [p for p in bundle.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    parts = {
        d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        for d in sorted(bundle.iterdir())
        if d.is_dir()
    }
    print(f"(c) contents: {bundle} is {total / MIB:.1f} MiB in {len(files)} files (limit {max_mib:g} MiB): "
          + ", ".join(f"{k}/ {v / MIB:.2f} MiB" for k, v in parts.items()))  # fmt: skip
    if total > max_mib * MIB:
        problems.append(f"{bundle} is {total / MIB:.1f} MiB, over {max_mib:g} MiB")

    manifest_path = bundle / "corpus" / "manifest.json"
    if not manifest_path.is_file():
        problems.append(f"{manifest_path} is missing")
    else:
        manifest = json.loads(manifest_path.read_text())
        for shard in manifest.get("shards", []):
            p = bundle / "corpus" / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["bytes"]:
                problems.append(f"corpus shard {p} is missing or not {shard['bytes']} bytes")
        tok = bundle / "corpus" / manifest.get("tokenizer", {}).get("dir", "tokenizer")
        if not tok.is_dir():
            problems.append(f"corpus tokenizer {tok} is missing")
        c = manifest.get("counts", {})
        vocab = manifest.get("tokenizer", {}).get("vocab_size")
        print(f"    corpus: {c.get('samples')} samples of {manifest.get('seq_len')} tokens in "
              f"{c.get('shards')} shard(s), {manifest.get('packing')} packing, vocabulary {vocab}")  # fmt: skip

    tasks = bundle / "tasks"
    missing = [
        str(p.relative_to(bundle))
        for p in [tasks / "glue" / t / "train.tsv" for t in GLUE_TASKS]
        + [tasks / "squad" / f"{split}-v1.1.json" for split in ("train", "dev")]
        if not p.is_file()
    ]
    if missing:
        problems.append(f"task files missing: {', '.join(missing)}")
    else:
        rows = sum(1 for _ in (tasks / "glue" / "SST-2" / "train.tsv").open()) - 1
        squad = json.loads((tasks / "squad" / "train-v1.1.json").read_text())
        questions = sum(len(p["qas"]) for d in squad["data"] for p in d["paragraphs"])
        print(f"    tasks: glue/ ({len(GLUE_TASKS)} tasks, e.g. SST-2 train {rows} rows), "
              f"squad/ (train-v1.1 {questions} questions; v2.0 too)")  # fmt: skip
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=ROOT / ".gpu_bundle")
    p.add_argument(
        "--python312", help="a Python 3.12 for the install rehearsal (default: found via PATH/pyenv)"
    )
    p.add_argument("--max-mib", type=float, default=40.0, help="largest bundle allowed (default: 40)")
    args = p.parse_args(argv)
    if not args.bundle.is_dir():
        print(
            f"check_bundle: FAILED: no bundle at {args.bundle} (run benchmarks/gpu_bundle.sh)",
            file=sys.stderr,
        )
        return 1
    wheels_dir = args.bundle / "wheels"
    problems = check_closure(wheels_dir, read_image_packages())
    problems += check_install(wheels_dir, find_python312(args.python312))
    problems += check_contents(args.bundle, args.max_mib)
    if problems:
        print("check_bundle: FAILED:\n" + "\n".join(f"  - {m}" for m in problems), file=sys.stderr)
        return 1
    print("check_bundle: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
