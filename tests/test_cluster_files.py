"""The files that start clusters: Ray's own `ray up` checks pass on the shipped YAMLs (also with 7 workers), nodes
install the tested versions, and the constraints file agrees with pyproject.toml."""

from __future__ import annotations

import copy
import re
from importlib import metadata

import pytest
import tomllib
import yaml
from helpers import REPO as ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = ROOT / "cluster" / "constraints.txt"
WORKERS_7 = [f"10.0.0.{i}" for i in range(11, 18)]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


def _ray_up_config(config: dict) -> dict:
    """What `ray up` resolves before it touches a machine: Ray's defaults merged in, its schema and consistency
    checks (`validate_config`), and the provider's own bootstrap — which needs no network for the local one."""
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import prepare_config, validate_config

    if config["provider"]["type"] == "local":
        return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    resolved = prepare_config(copy.deepcopy(config))  # a cloud's bootstrap would call its API
    validate_config(resolved)
    return resolved


def _local_workers(resolved: dict) -> tuple[int, int]:
    (node_type,) = [t for name, t in resolved["available_node_types"].items() if name != "head"]
    return node_type["min_workers"], node_type["max_workers"]


@pytest.mark.parametrize("workers", [None, WORKERS_7], ids=["as shipped", "7 workers"])
def test_eval_cluster_passes_ray_up_checks_and_starts_every_worker(workers):
    config = _load("eval.yaml")
    if workers:
        config["provider"]["worker_ips"] = workers
    resolved = _ray_up_config(config)
    n = len(config["provider"]["worker_ips"])
    assert resolved["max_workers"] == n and _local_workers(resolved) == (n, n)


def test_prep_cluster_passes_ray_up_checks():
    resolved = _ray_up_config(_load("prep.yaml"))
    assert resolved["available_node_types"]["cpu_worker"]["max_workers"] == 16
    assert (ROOT / "data_prep" / "cli.py").is_file()  # the script its usage line submits


def test_prep_cluster_on_local_machines_as_its_comment_says():
    """prep.yaml says how to run it on machines you have; done as said, with 7 workers, `ray up` accepts it."""
    text = (ROOT / "cluster" / "prep.yaml").read_text()
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    provider = yaml.safe_load(re.search(r"(provider: \{type: local.*?\})", comment).group(1))["provider"]
    dropped = ["max_workers", "available_node_types", "head_node_type"]
    assert re.search(r"delete `max_workers`, `available_node_types` and `head_node_type`", comment)
    config = {k: v for k, v in _load("prep.yaml").items() if k not in dropped}
    config["provider"] = {**provider, "worker_ips": WORKERS_7}
    resolved = _ray_up_config(config)
    assert _local_workers(resolved) == (7, 7)


# --- what the nodes install --------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return [Requirement(s) for s in specs]


def test_constraints_pin_every_requirement_within_pyproject():
    pins = _pins()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        if name == "sparsebert":  # an extra naming another of the project's own extras ("sparsebert[s3]")
            continue
        assert name in pins, (
            f"{req.name} is not pinned in {CONSTRAINTS.name}: python cluster/freeze_constraints.py"
        )
        assert Version(pins[name]) in req.specifier, f"{req.name}=={pins[name]} outside {req}"
    assert not any(
        "+" in v for v in pins.values()
    )  # no local label: a CUDA build of the release satisfies it
    # The release the suite runs on here (README's set-up installs this torch).
    assert pins["torch"] == Version(metadata.version("torch")).public


@pytest.mark.parametrize("name", ["eval.yaml", "prep.yaml"])
def test_nodes_install_the_tested_versions_and_every_default_dependency(name):
    commands = _load(name)["setup_commands"]
    pips = [c for c in commands if "pip install" in c]
    # Every install is constrained to the tested versions; torch comes first, then the whole project (so every
    # default dependency, the sentence splitter included), never a hand-picked subset.
    assert pips and all("-c cluster/constraints.txt" in c and "cd ~/sparsebert" in c for c in pips), pips
    assert re.search(r"pip install .* torch( |$)", pips[0]) and "download.pytorch.org/whl/" in pips[0]
    assert re.search(r"pip install .* -e (\.|\"\.\[[\w,]+\]\")$", pips[-1]) and "--no-deps" not in " ".join(
        pips
    )
    wheel = re.search(r"download\.pytorch\.org/whl/(\w+)", pips[0]).group(1)
    assert wheel == ("cpu" if name == "prep.yaml" else "cu126")


def test_docker_image_is_the_tested_torch_installed_at_the_tested_versions_by_a_user_owning_its_workdir():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(
        r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-devel@sha256:", dockerfile, re.M
    )
    assert base and base.group(1) == _pins()["torch"]  # the release the suite is tested with
    assert re.search(r'pip install -c cluster/constraints\.txt -e "\.\[\$\{EXTRAS\}\]"', dockerfile)
    env = " ".join(re.findall(r"^ENV (?:.*\\\n)*.*$", dockerfile, re.M))
    assert "HF_HUB_OFFLINE" not in env  # the hub stays reachable; users opt out with -e HF_HUB_OFFLINE=1
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    assert f"install -d -o sparsebert -g sparsebert {workdir}" in dockerfile  # made by and for the user
    assert re.search(r"^USER (\d+)$", dockerfile, re.M).group(1) == "1000"
    assert "useradd --create-home --shell /bin/bash --uid 1000 sparsebert" in dockerfile
    assert "tests/test_cluster_launch.py" in (ROOT / "cluster" / "docker_smoke.sh").read_text()
