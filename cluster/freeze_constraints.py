"""Write cluster/constraints.txt: the exact version of every package the project installs (its dependencies and
every extra, followed transitively) as installed in the environment the test suite passed in.

    python cluster/freeze_constraints.py            # rewrite cluster/constraints.txt from this environment
    python cluster/freeze_constraints.py --check    # exit 1 naming what differs, writing nothing

Run it in the environment the tests passed in, after README's set-up (plus any extra you ship). It is `pip
freeze` restricted to what the project pulls in, with local version labels dropped (``torch 2.13.0+cpu`` is pinned
as ``torch==2.13.0``, which a CUDA build of that release such as ``2.13.0+cu130`` also satisfies). The Dockerfile
and the cluster YAMLs install with ``pip install -c cluster/constraints.txt``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "cluster" / "constraints.txt"


def _roots() -> tuple[str, list[Requirement]]:
    """The project's name and its requirements: the dependencies and every optional extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return canonicalize_name(project["name"]), [Requirement(s) for s in specs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure() -> tuple[dict[str, str], list[str]]:
    """{canonical name: installed version without local label} for everything the project pulls in, and the
    names of required packages that are not installed here (reported, never guessed)."""
    project, roots = _roots()
    pins: dict[str, str] = {}
    missing: list[str] = []
    todo = [(r, set(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name == project or (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
            continue
        pins[name] = Version(dist.version).public
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if _applies(sub, extras):
                todo.append((sub, set(sub.extras)))
    return dict(sorted(pins.items())), sorted(set(missing))


def render(pins: dict[str, str]) -> str:
    header = [
        "# Tested versions: every package the project installs, pinned as in the environment the test suite",
        "# passed in (Python "
        + ".".join(map(str, sys.version_info[:2]))
        + f", {platform.system()} {platform.machine()}). Generated; do not edit:",
        "#   python cluster/freeze_constraints.py",
        '# Use: pip install -c cluster/constraints.txt -e ".[...]" (torch first, on GPU machines: its CUDA build of',
        "# the pinned release satisfies the pin).",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in pins.items()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with cluster/constraints.txt, write nothing"
    )
    args = parser.parse_args(argv)
    pins, missing = closure()
    if missing:
        print(f"error: required but not installed here: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = render(pins)
    if args.check:
        old = OUT.read_text() if OUT.exists() else ""
        current = {line for line in text.splitlines() if not line.startswith("#")}
        written = {line for line in old.splitlines() if not line.startswith("#")}
        if current != written:
            print(f"error: {OUT} differs from this environment:", file=sys.stderr)
            for line in sorted(written - current):
                print(f"  - {line}", file=sys.stderr)
            for line in sorted(current - written):
                print(f"  + {line}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"{OUT}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
