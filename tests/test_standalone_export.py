"""Standalone exports load with transformers alone (``trust_remote_code=True``) and compute what the package
computes; without the flag transformers refuses; with the package, ``import sparsebert`` alone makes the Auto
classes and pipelines load them. Small exports are built here in-process; pre-training's own ``final/`` is
tests/test_export_pretraining.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers_only
from helpers import REPO

from eval.smoke import write_tiny_checkpoint
from sparsebert import (
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForPreTraining,
    SparseBertForSequenceClassification,
)
from sparsebert.model.standalone import auto_map, shipped_sources

SEARCHED, LONGER = 16, 40  # DAM masks searched at 16 tokens, used at 40


def _searched(model: SparseBertForPreTraining, seq_len: int) -> None:
    """A few search passes at ``seq_len`` (α moves, the searched length is recorded), then the freeze."""
    model.train()
    ids = torch.randint(5, 60, (4, seq_len))
    optimizer = torch.optim.SGD(model.mask_source.parameters(), lr=10.0)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.freeze_mask()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Standalone exports (tokenizer included) and the package's outputs on fixed inputs, in ``refs.pt``."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    folders = {}
    for name, pattern in [
        ("star", "star"),
        ("dam_s", {"name": "dam_s"}),
        ("dam_u", {"name": "dam_u", "max_len": 64}),
    ]:
        folder = write_tiny_checkpoint(root / name, pattern)
        model = SparseBertForPreTraining.from_pretrained(folder)
        if model.config.mask_spec.learned:
            _searched(model, SEARCHED)
        model.save_pretrained(folder, standalone=True)
        folders[name] = folder
    classifier = SparseBertForSequenceClassification.from_pretrained(
        folders["dam_s"], num_labels=3, id2label={0: "no", 1: "maybe", 2: "yes"}
    )
    classifier.save_pretrained(root / "dam_s_cls", standalone=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (root / "dam_s_cls" / file).write_bytes((folders["dam_s"] / file).read_bytes())
    folders["dam_s_cls"] = root / "dam_s_cls"

    ids = torch.randint(5, 60, (3, LONGER))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 30:] = 0
    refs = {"ids": ids, "attention_mask": attention_mask}
    with torch.no_grad():
        for name in ("star", "dam_s", "dam_u"):
            model = SparseBertForMaskedLM.from_pretrained(folders[name]).eval()
            refs[name] = model(ids, attention_mask=attention_mask).logits
        cls = SparseBertForSequenceClassification.from_pretrained(folders["dam_s_cls"]).eval()
        refs["dam_s_cls"] = cls(ids, attention_mask=attention_mask).logits
    torch.save(refs, root / "refs.pt")
    return folders


def test_the_export_holds_the_code_and_an_auto_map(exports):
    folder = exports["dam_s"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == auto_map() and config["model_type"] == "sparsebert"
    assert config["dam_searched_len"] == SEARCHED
    shipped = shipped_sources()
    for name, text in shipped.items():
        assert (folder / name).read_text() == text
    assert "from .sparsebert_masks import" in shipped["sparsebert_modeling.py"]
    assert "import sparsebert" not in "".join(shipped.values()).replace("import sparsebert_", "")


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers, then loads four models
def test_transformers_alone_loads_it_with_trust_remote_code_and_matches_the_package(exports, tmp_path):
    """The Auto classes and pipelines, in a process without the package: the package's logits to 1e-5, beyond
    the DAM masks' searched length too; the same model saved again keeps its code; no flag, a refusal."""
    root = exports["star"].parent
    result = transformers_only.run(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

        root = {str(root)!r}
        refs = torch.load(root + "/refs.pt")
        out = {{"diff": {{}}}}
        with torch.no_grad():
            for name in ("star", "dam_s", "dam_u"):
                model = AutoModelForMaskedLM.from_pretrained(root + "/" + name, trust_remote_code=True).eval()
                logits = model(refs["ids"], attention_mask=refs["attention_mask"]).logits
                out["diff"][name] = float((logits - refs[name]).abs().max())
                out.setdefault("modules", []).append(type(model).__module__)
            cls = AutoModelForSequenceClassification.from_pretrained(root + "/dam_s_cls", trust_remote_code=True)
            logits = cls.eval()(refs["ids"], attention_mask=refs["attention_mask"]).logits
            out["diff"]["dam_s_cls"] = float((logits - refs["dam_s_cls"]).abs().max())
            cls.save_pretrained(root + "/resaved")  # a shipped copy saves its code along
            again = AutoModelForSequenceClassification.from_pretrained(root + "/resaved", trust_remote_code=True)
            logits = again.eval()(refs["ids"], attention_mask=refs["attention_mask"]).logits
            out["diff"]["resaved"] = float((logits - refs["dam_s_cls"]).abs().max())
        fill = pipeline("fill-mask", model=root + "/dam_s", trust_remote_code=True)
        out["fill"] = fill("the cat [MASK] the dog.")[0]["token_str"]
        classify = pipeline("text-classification", model=root + "/dam_s_cls", trust_remote_code=True)
        out["label"] = classify("the cat saw the dog.")[0]["label"]
        try:
            AutoModelForMaskedLM.from_pretrained(root + "/dam_s")
        except ValueError as err:
            out["refused"] = str(err)
        emit(out)
        """,
        tmp_path,
    )
    assert all(diff <= 1e-5 for diff in result["diff"].values()), result["diff"]
    assert all(m.startswith("transformers_modules.") for m in result["modules"])
    assert result["fill"] and result["label"] in {"no", "maybe", "yes"}
    assert "trust_remote_code=True" in result["refused"]
    assert (root / "resaved" / "sparsebert_modeling.py").read_text() == shipped_sources()[
        "sparsebert_modeling.py"
    ]


def test_import_sparsebert_alone_makes_pipelines_and_auto_classes_load_an_export(exports):
    """A fresh process: ``import sparsebert`` imports no torch, yet afterwards transformers' pipeline and Auto
    classes load an export through the package's own classes (no trust_remote_code needed)."""
    script = textwrap.dedent(
        f"""
        import json, sys
        import sparsebert
        light = "torch" not in sys.modules and "transformers" not in sys.modules
        from transformers import AutoModelForSequenceClassification, pipeline
        fill = pipeline("fill-mask", model={str(exports["star"])!r})
        cls = AutoModelForSequenceClassification.from_pretrained({str(exports["dam_s_cls"])!r})
        print(json.dumps({{"light": light, "fill": type(fill.model).__module__, "cls": type(cls).__name__,
                           "guess": fill("the [MASK] ran.")[0]["token_str"]}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["light"] and result["fill"] == "sparsebert.model.modeling" and result["guess"]
    assert result["cls"] == "SparseBertForSequenceClassification"


def test_a_plain_save_has_no_code_and_no_auto_map(exports, tmp_path):
    model = SparseBertForPreTraining.from_pretrained(exports["star"])
    assert model.config.auto_map == auto_map()  # read from the export
    model.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    assert not list(tmp_path.glob("sparsebert_*.py"))
    assert model.config.auto_map == auto_map()  # the model itself is left as it was


def every_other_key(seq_len, num_heads):
    return (torch.arange(seq_len) % 2 == 0).expand(seq_len, seq_len).clone()


def test_a_users_own_pattern_cannot_be_shipped(tmp_path):
    config = SparseBertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        attention_pattern=f"{__name__}:every_other_key",
    )  # fmt: skip
    model = SparseBertForPreTraining(config)
    with pytest.raises(ValueError, match=r"every_other_key' is your own code.*standalone=False"):
        model.save_pretrained(tmp_path / "out", standalone=True)
    assert not (tmp_path / "out").exists()
