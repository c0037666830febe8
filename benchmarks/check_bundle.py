"""Rehearse, on this CPU machine, what the GPU machine does with the bundle benchmarks/gpu_bundle.sh builds.

    python benchmarks/check_bundle.py [--bundle .gpu_bundle] [--python312 PATH]

(a) Dependency closure, for CPython 3.12 on Linux x86_64 (the GPU machine's Python): everything the GPU run
    imports (benchmarks/bundle_closure.py: its entry points and scripts, and every project module they reach,
    function-level imports included), followed through every carried wheel's Requires-Dist (markers
    evaluated, ``extra ==`` ones skipped), must be a carried wheel or in the GPU image
    (benchmarks/gpu_image_packages.txt). Also fails on: a package carried twice, wheels other than those of
    benchmarks/gpu_bundle_packages.txt, a carried version its dependants exclude, a wheel that does not
    install on CPython 3.12 manylinux x86_64, a wheel nothing needs, and a deepspeed wheel with prebuilt ops.
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
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_closure import (
    BUNDLE_LIST,
    GPU_PYTHON,
    ROOT,
    Carried,
    closure_problems,
    gpu_imports,
    read_image_packages,
    read_list,
)

MAX_GLIBC_MINOR = 28  # the newest manylinux_2_N the bundle's `pip download --platform` flags accept
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


def read_wheel(path: Path) -> tuple[Carried, str | None]:
    """The wheel as a carried package, and its Requires-Python."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        metadata = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(metadata) != 1:
            raise ValueError(f"{path.name}: {len(metadata)} .dist-info/METADATA files")
        meta = HeaderParser().parsestr(zf.read(metadata[0]).decode("utf-8"))
    carried = Carried(
        name=canonicalize_name(name),
        version=version,
        requires=[Requirement(r) for r in meta.get_all("Requires-Dist") or []],
        source=path.name,
        size=path.stat().st_size,
    )
    return carried, meta.get("Requires-Python")


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


def wheel_contents_problems(path: Path, name: str) -> list[str]:
    """A pure (py3-none-any) wheel holds no compiled code; the deepspeed wheel has no op prebuilt."""
    problems = []
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pure = all(t.abi == "none" and t.platform == "any" for t in parse_wheel_filename(path.name)[3])
        compiled = [n for n in names if n.endswith((".so", ".pyd", ".dylib")) or ".so." in n]
        if pure and compiled:
            problems.append(f"{path.name} is tagged pure Python but holds compiled files: {compiled[:3]}")
        if name == "deepspeed":
            info = "deepspeed/git_version_info_installed.py"
            if info not in names:
                problems.append(f"{path.name}: no {info}, cannot tell which ops were prebuilt")
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
                        f"{path.name} has prebuilt ops {prebuilt or compiled[:3]}: "
                        "build it with DS_BUILD_OPS=0"
                    )
    return problems


# ---------------------------------------------------------------------------------------------- (a) closure


def check_closure(wheels_dir: Path, image: set[str]) -> list[str]:
    """The wheels themselves (each installs on the GPU's Python, no package twice, exactly the packages of
    benchmarks/gpu_bundle_packages.txt), then the closure of what the GPU run imports (bundle_closure.py)."""
    problems: list[str] = []
    carried: dict[str, Carried] = {}
    paths = sorted(wheels_dir.glob("*.whl"))
    if not paths:
        return [f"no wheels in {wheels_dir}"]
    for path in paths:
        w, requires_python = read_wheel(path)
        if w.name in carried:
            problems.append(f"{w.name} is carried twice: {carried[w.name].source} and {path.name}")
            continue
        carried[w.name] = w
        if not installs_on_gpu(path):
            problems.append(f"{path.name} does not install on CPython 3.12 manylinux x86_64")
        if requires_python and not SpecifierSet(requires_python).contains(GPU_PYTHON, prereleases=True):
            problems.append(f"{path.name} requires Python {requires_python}, the GPU has {GPU_PYTHON}")
        problems += wheel_contents_problems(path, w.name)
    listed = read_list(BUNDLE_LIST)
    if sorted(listed) != sorted(carried):
        problems.append(
            f"the wheels ({', '.join(sorted(carried))}) are not the packages of "
            f"{BUNDLE_LIST.relative_to(ROOT)} ({', '.join(sorted(listed))})"
        )
    try:
        imports = gpu_imports()
    except RuntimeError as err:
        return [*problems, str(err)]
    return problems + closure_problems(list(carried.values()), image, imports)


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
