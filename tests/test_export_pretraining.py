"""Pre-training's ``final/`` as others receive it: the demo's preset, shortened, with 128 positions while its corpus
has 64-token samples (so the DAM mask is searched at 64 and used beyond). The folder loads with transformers alone
(``trust_remote_code=True``, the package's logits to 1e-5 at both lengths, a refusal without it), its model card
says what it is, and ``export.push_to_hub`` uploads it, card and code included, to a local server that answers the
Hub's HTTP API. Its upload command (``python -m sparsebert.export.hub``) on its own, and its errors, too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers_only
from helpers import REPO
from hub_server import HubServer

from sparsebert import SparseBertForMaskedLM

STEPS, SEARCH, SEARCHED_LEN, LENGTH = 6, 3, 64, 128


def _hub_env(hub: HubServer) -> dict[str, str]:
    # the local server stands for the Hub: its address, a stand-in token, online for it alone
    return {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with HubServer() as hub:
        cmd = [
            sys.executable, str(REPO / "sparsebert" / "pretrain.py"), "--config", "tiny_cpu", f"output_dir={root / 'run'}",
            f"model.max_position_embeddings={LENGTH}", f"train.max_steps={STEPS}", f"dam.search_steps={SEARCH}",
            "eval.every=3", "eval.max_batches=2", "checkpoint.every=0", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            "export.push_to_hub=lab/demo",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=root, env=_hub_env(hub), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run" / "final", hub, proc.stdout


pytestmark = pytest.mark.slow


def test_final_loads_with_transformers_alone_beyond_the_searched_length(demo, tmp_path):
    final, _, _ = demo
    torch.manual_seed(0)
    refs = {}
    model = SparseBertForMaskedLM.from_pretrained(final).eval()
    assert model.config.dam_searched_len == SEARCHED_LEN
    for length in (SEARCHED_LEN, LENGTH):
        ids = torch.randint(5, 500, (2, length))
        with torch.no_grad():
            refs[length] = (ids, model(ids).logits)
    torch.save(refs, tmp_path / "refs.pt")
    result = transformers_only.run(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM, pipeline

        final, refs = {str(final)!r}, torch.load({str(tmp_path / "refs.pt")!r})
        model = AutoModelForMaskedLM.from_pretrained(final, trust_remote_code=True).eval()
        out = {{}}
        with torch.no_grad():
            for length, (ids, logits) in refs.items():
                out[str(length)] = float((model(ids).logits - logits).abs().max())
        fill = pipeline("fill-mask", model=final, trust_remote_code=True)
        out["fill"] = fill("a function is defined with the [MASK] statement.")[0]["token_str"]
        try:
            AutoModelForMaskedLM.from_pretrained(final)
        except ValueError as err:
            out["refused"] = str(err)
        emit(out)
        """,
        tmp_path,
    )
    assert result[str(SEARCHED_LEN)] <= 1e-5 and result[str(LENGTH)] <= 1e-5, result
    assert result["fill"] and "trust_remote_code=True" in result["refused"]


def test_the_card_says_what_the_model_is(demo):
    final, _, _ = demo
    card = (final / "README.md").read_text()
    header, _, body = card.partition("\n---\n")
    assert "pipeline_tag: fill-mask" in header and "custom_code" in header and "dam-s" in header
    for text in (
        "**`dam_s`**", "`lambda` = 0.0001", "| layers | head 0 | head 1 |", f"searched at sequence length {SEARCHED_LEN}",
        f"steps: {STEPS} ({SEARCH} of them searching the mask)", "token positions", "held-out MLM loss",
        "documents held out", "AutoModelForMaskedLM.from_pretrained", "trust_remote_code=True",
        "silently drops the mask", "@inproceedings{shi2021sparsebert",
    ):  # fmt: skip
        assert text in body, text
    figures = [line for line in body.splitlines() if line.startswith("![")]
    assert figures and all((final / line.split("(")[1].rstrip(")")).is_file() for line in figures)


def test_push_to_hub_uploads_the_folder_with_its_card_and_code(demo):
    final, hub, stdout = demo
    files = hub.repos["lab/demo"].files
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert files == local and "sparsebert_modeling.py" in files and "model.safetensors" in files
    assert 'from_pretrained("lab/demo", trust_remote_code=True)' in files["README.md"].decode()
    assert hub.repos["lab/demo"].private is True
    assert "uploaded final/ to the Hub" in stdout


def test_the_upload_command_and_its_errors(demo, tmp_path):
    final, _, _ = demo
    with HubServer() as hub:
        env = _hub_env(hub)
        run = [sys.executable, "-m", "sparsebert.export.hub"]
        ok = subprocess.run(
            [*run, str(final), "lab/again", "--public"], env=env, capture_output=True, text=True
        )
        assert ok.returncode == 0 and "uploaded" in ok.stdout, ok.stderr[-2000:]
        assert hub.repos["lab/again"].private is False and "config.json" in hub.repos["lab/again"].files
        bad = subprocess.run([*run, str(final), "no-org"], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and "'org/name'" in bad.stderr
        missing = subprocess.run([*run, str(tmp_path), "lab/x"], env=env, capture_output=True, text=True)
        assert missing.returncode == 1 and "not a model folder (no config.json)" in missing.stderr
    closed = subprocess.run([*run, str(final), "lab/closed"], env=env, capture_output=True, text=True)
    assert closed.returncode == 1
    (line,) = closed.stderr.strip().splitlines()[-1:]
    assert f"uploading {final} to the Hub repo lab/closed failed" in line
