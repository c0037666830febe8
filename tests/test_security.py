"""Shut doors: a saved config runs no code unless trusted, clusters keep the dashboard private and
authenticated, and the Docker image holds neither local data nor secrets."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import uuid
from importlib import metadata

import pytest
import torch
import yaml
from helpers import REPO as ROOT
from helpers import TINY
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import AutoModelForPreTraining

from sparsebert import (
    SparseBertConfig,
    SparseBertForPreTraining,
    SparseBertForSequenceClassification,
    SparseBertModel,
)

CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
# The first Ray release with token authentication on by default (for local clusters; see cluster/*.yaml).
RAY_TOKEN_AUTH_DEFAULT = Version("2.59")


# --- a saved "package.module:function" pattern is code: imported only with trust_remote_code ----------------


@pytest.fixture
def saved_with_code_pattern(tmp_path, monkeypatch):
    """A model saved with a pattern from a module written for this test; the module is then unloaded, so a
    later import of it shows in ``sys.modules``. Yields (checkpoint dir, module name, pattern, mask at L=8)."""
    module = f"sb_user_masks_{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import torch

            def every_third_key(seq_len, num_heads, offset=0):
                j = torch.arange(seq_len)
                return ((j + offset) % 3 == 0).expand(seq_len, seq_len).clone()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    pattern = {"name": f"{module}:every_third_key", "offset": 1}
    model = SparseBertForPreTraining(SparseBertConfig(**TINY, attention_pattern=pattern))  # in code: allowed
    expected = model.current_mask(8)
    model.save_pretrained(tmp_path / "ckpt")
    del model
    sys.modules.pop(module)
    yield tmp_path / "ckpt", module, pattern["name"], expected
    sys.modules.pop(module, None)


LOADERS = {
    "pretraining": lambda d, **kw: SparseBertForPreTraining.from_pretrained(d, **kw),
    "model": lambda d, **kw: SparseBertModel.from_pretrained(d, **kw),
    "classification": lambda d, **kw: SparseBertForSequenceClassification.from_pretrained(
        d, num_labels=2, **kw
    ),
    "config": lambda d, **kw: SparseBertConfig.from_pretrained(d, **kw),
    "config_json": lambda d, **kw: SparseBertConfig.from_json_file(d / "config.json", **kw),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("flag", [{}, {"trust_remote_code": False}])
def test_saved_code_pattern_is_refused_without_trust(saved_with_code_pattern, loader, flag):
    ckpt, module, name, _ = saved_with_code_pattern
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}'.*trust_remote_code=True"):
        LOADERS[loader](ckpt, **flag)
    assert module not in sys.modules


def test_auto_classes_refuse_it_too(saved_with_code_pattern):
    ckpt, module, name, _ = saved_with_code_pattern
    # AutoConfig drops trust_remote_code before it builds the config: refused even with the flag, never imported.
    with pytest.raises(ValueError, match=re.escape(name)):
        AutoModelForPreTraining.from_pretrained(ckpt, trust_remote_code=True)
    assert module not in sys.modules
    config = SparseBertConfig.from_pretrained(ckpt, trust_remote_code=True)
    assert isinstance(AutoModelForPreTraining.from_pretrained(ckpt, config=config), SparseBertForPreTraining)


@pytest.mark.parametrize("loader", ["pretraining", "model", "classification"])
def test_trusted_load_imports_the_pattern_and_restores_its_mask(saved_with_code_pattern, loader):
    ckpt, module, _, expected = saved_with_code_pattern
    model = LOADERS[loader](ckpt, trust_remote_code=True)
    assert module in sys.modules
    assert torch.equal(model.current_mask(8), expected)
    j = torch.arange(8)
    assert torch.equal(expected[0, 0], ((j + 1) % 3 == 0).expand(8, 8))  # the module's rule, offset 1


def test_trust_lasts_only_for_its_load(saved_with_code_pattern):
    ckpt, module, _, _ = saved_with_code_pattern
    SparseBertConfig.from_pretrained(ckpt, trust_remote_code=True)
    sys.modules.pop(module)
    with pytest.raises(ValueError, match="trust_remote_code"):
        SparseBertConfig.from_pretrained(ckpt)
    assert module not in sys.modules


def test_callers_own_pattern_replaces_the_saved_one_unimported(saved_with_code_pattern):
    ckpt, module, _, _ = saved_with_code_pattern
    model = SparseBertForSequenceClassification.from_pretrained(ckpt, num_labels=2, attention_pattern="star")
    assert model.config.mask_spec.name == "star"
    assert module not in sys.modules


def test_builtin_patterns_load_without_the_flag(tmp_path):
    model = SparseBertForPreTraining(SparseBertConfig(**TINY, attention_pattern="longformer"))
    model.save_pretrained(tmp_path)
    assert SparseBertForPreTraining.from_pretrained(tmp_path).config.mask_spec.name == "longformer"
    assert json.loads((tmp_path / "config.json").read_text())["attention_pattern"]["name"] == "longformer"


# --- Ray clusters: dashboard on localhost only, token authentication on ------------------------------------


def _commands(config: dict) -> list[str]:
    keys = [k for k in config if k.endswith("_commands")]
    return [str(c) for k in keys for c in (config[k] or [])]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_dashboard_stays_on_localhost(path):
    config = yaml.safe_load(path.read_text())
    commands = _commands(config)
    starts = config["head_start_ray_commands"]
    assert any("ray start --head" in c for c in starts)
    for command in commands:
        assert "0.0.0.0" not in command and "[::]" not in command, command
        for host in re.findall(r"--dashboard-host[= ](\S+)", command):
            assert host in ("127.0.0.1", "localhost"), command


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_keeps_token_auth_on(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?(disabled|none|off)", text, re.IGNORECASE)
    # Every `ray start` requires the token (fails closed if it is missing), and every node gets the token.
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token ray start" in command, command
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_ray_requirement_has_token_auth_by_default():
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = Requirement(re.search(r'^\s*"(ray\[[^"]*)"', pyproject, re.MULTILINE).group(1))
    floor = min(Version(s.version) for s in spec.specifier if s.operator in (">=", "=="))
    assert floor >= RAY_TOKEN_AUTH_DEFAULT
    assert Version(metadata.version("ray")) in spec.specifier
    # Cluster nodes install the Ray that cluster/constraints.txt pins: one with the same default.
    pinned = re.search(r"^ray==([\d.]+)$", (ROOT / "cluster" / "constraints.txt").read_text(), re.MULTILINE)
    assert Version(pinned.group(1)) >= RAY_TOKEN_AUTH_DEFAULT
    for path in CLUSTER_YAMLS:
        assert "-c cluster/constraints.txt" in path.read_text(), path.name


# --- Docker: nothing local or secret in the build context, no baked SSH host keys, a pinned base ------------


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches the path or one of its parent folders, from the context root; `**`
    spans folders, `*` does not; the last matching line wins (`!` re-includes)."""
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_and_secrets_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    for path in [
        "data/glue/SST-2/train.tsv",
        "runs/dam_s/final/model.safetensors",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "eval_results/mlflow.db",
        ".env",
        ".venv/bin/python",
        "venv/lib/site.py",
        ".gpu_bundle/wheels/deepspeed.whl",
        "eval_results/results.md",
        ".git/config",
    ]:
        assert _dockerignored(path, patterns), path
    for path in [
        "sparsebert/data/reader.py",
        "sparsebert/model/modeling.py",
        "eval/run.py",
        "pyproject.toml",
    ]:
        assert not _dockerignored(path, patterns), path


def test_dockerfile_pins_its_base_and_bakes_no_host_keys():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+:\S+@sha256:[0-9a-f]{64}\b", dockerfile, re.MULTILINE)
    for step in re.split(r"\n(?=[A-Z]+ )", dockerfile):
        if "openssh-server" in step and step.startswith("RUN"):
            assert "rm -f /etc/ssh/ssh_host_" in step  # in the same layer, so no layer keeps them
