"""Continuing pre-training (phase 1 → phase 2 at a longer length, from an HF BERT): weights, mask and optimizer
moments carry over, the schedule starts fresh, and mismatches are errors that name both sides.

Phase 1 runs once as the real entry point (one process, ZeRO-0, LAMB, a DAM_s search frozen after 3 steps);
phase 2 runs in this process through ``trainer.setup``/``train``/``finish``, with the real DeepSpeed engine, so
its optimizer state can be read directly and compared with the tensors of phase 1's DeepSpeed checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PRETRAIN, REPO, SYLLABLES, free_port, syllable_documents

from sparsebert import SparseBertForPreTraining
from sparsebert.model.masks import build_mask
from sparsebert.train.config import ConfigError, load_config
from sparsebert.train.optim import build_scheduler

PHASE1_STEPS = 6
QUIET = ["mlflow.enabled=false", "eval.every=0", "checkpoint.every=0", "train.micro_batch_size=4"]

pytestmark = pytest.mark.slow


def _prepare(root: Path, name: str, syllables: tuple[str, ...], **settings) -> Path:
    from data_prep import prepare_corpus

    (root / f"{name}.txt").write_text(syllable_documents(60, syllables))
    prepare_corpus([root / f"{name}.txt"], root / name, seed=0, shard_size=64, progress=False, **settings)
    return root / name


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Phase 1's corpus (seq 64), phase 2's (seq 128, phase 1's tokenizer), and one with another vocabulary."""
    root = tmp_path_factory.mktemp("corpora")
    short = _prepare(root, "seq64", SYLLABLES, vocab_size=300, seq_len=64)
    long = _prepare(root, "seq128", SYLLABLES, tokenizer=str(short / "tokenizer"), seq_len=128)
    other = _prepare(root, "other", ("be", "da", "fe", "gu", "ho"), vocab_size=200, seq_len=128)
    return {"seq64": short, "seq128": long, "other": other}


@pytest.fixture(scope="module")
def phase1(tmp_path_factory, corpora) -> Path:
    """A finished phase-1 run: a DAM_s search (3 steps) frozen in place, then 3 steps with the frozen mask."""
    out = tmp_path_factory.mktemp("phase1") / "run"
    cmd = [
        sys.executable, str(PRETRAIN), "--config", "tiny_cpu", f"output_dir={out}", f"data.path={corpora['seq64']}",
        "model.max_position_embeddings=128", "model.attention_pattern={name: dam_s, lambda: 0.01}",
        f"train.max_steps={PHASE1_STEPS}", "dam.search_steps=3", "train.warmup_steps=2", "train.optimizer=lamb",
        *QUIET,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rank_env():
    """One rank, as a plain ``python sparsebert/pretrain.py`` forms it, for the whole module (DeepSpeed keeps
    the process group it first saw); torn down at the end."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        ).items():
            patch.setenv(key, value)
        yield
        from sparsebert.train import distributed as deepspeed_setup

        deepspeed_setup.destroy_process_group()


def _setup(out: Path, data: Path, *overrides: str):
    from sparsebert.train import trainer as pretrain

    config = load_config(None, [f"output_dir={out}", f"data.path={data}", *QUIET, *overrides])
    return pretrain, pretrain.setup(config)


def test_phase2_keeps_weights_frozen_mask_and_moments_with_a_fresh_schedule(
    phase1, corpora, tmp_path, rank_env
):
    pretrain, run = _setup(
        tmp_path / "phase2", corpora["seq128"], f"model.init_from={phase1}", "model.init_optimizer=true",
        "train.max_steps=3", "train.warmup_steps=2", "train.lr=1e-3", "train.betas=[0.8, 0.99]",
    )  # fmt: skip
    before = SparseBertForPreTraining.from_pretrained(phase1 / "final")
    assert run.seq_len == 128 and run.state.step == 0 and run.state.stage == 2
    assert run.model.mask_frozen and run.model.config.attention_pattern["frozen"]
    assert torch.equal(run.model.current_mask(128), before.current_mask(128))
    theirs = before.state_dict()
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)

    # The moments are phase 1's, read back from its DeepSpeed checkpoint (ZeRO-0: with the module states).
    tag = f"step{PHASE1_STEPS:08d}"
    saved = torch.load(
        phase1 / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
    )["optimizer"]
    loaded = run.engine.optimizer.state_dict()
    assert loaded["state"].keys() == saved["state"].keys() and len(loaded["state"]) > 0
    for index, moments in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert moments[key].abs().sum() > 0
            torch.testing.assert_close(loaded["state"][index][key], moments[key], rtol=0, atol=0)
    # ... but the schedule and hyperparameters are this run's: warm-up from 0, its own betas.
    assert run.scheduler.last_epoch == 0
    groups = run.engine.optimizer.param_groups
    fresh = build_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1e-3), run.config.train).get_last_lr()[0]
    assert [g["lr"] for g in groups] == [fresh, fresh, 0.0]  # the frozen α takes no steps
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    assert [g["name"] for g in groups][-1] == "dam_alpha" and run.scheduler.base_lrs[-1] == 0.0

    assert pretrain.train(run)
    pretrain.finish(run)
    after = SparseBertForPreTraining.from_pretrained(run.out / "final")
    assert after.config.attention_pattern["frozen"]
    assert torch.equal(after.current_mask(128), before.current_mask(128)), "phase 2 changed the frozen mask"
    assert not torch.equal(
        after.bert.encoder.layer[0].attention.self.query.weight,
        before.bert.encoder.layer[0].attention.self.query.weight,
    )


def test_mismatches_are_errors_naming_both_sides(phase1, corpora, tmp_path, rank_env):
    with pytest.raises(ConfigError, match="tokenizer mismatch") as error:
        _setup(tmp_path / "a", corpora["other"], f"model.init_from={phase1}")
    assert str(phase1) in str(error.value) and str(corpora["other"] / "tokenizer") in str(error.value)
    with pytest.raises(ConfigError, match=r"contradicts the mask of model\.init_from") as error:
        _setup(
            tmp_path / "b",
            corpora["seq128"],
            f"model.init_from={phase1}",
            "model.attention_pattern=longformer",
        )
    assert "dam_s" in str(error.value) and "longformer" in str(error.value)
    with pytest.raises(ConfigError, match=r"model\.init_optimizer' needs model\.init_from"):
        load_config(None, ["model.init_optimizer=true"])


def test_continuing_from_a_plain_hf_bert_takes_the_mask_from_the_config(corpora, tmp_path, rank_env, capsys):
    """... and extends its 64 position embeddings to the corpus's 128 by copying."""
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    tokenizer = AutoTokenizer.from_pretrained(corpora["seq128"] / "tokenizer")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    bert = BertForPreTraining(config)
    bert.save_pretrained(tmp_path / "bert")
    _, run = _setup(
        tmp_path / "out", corpora["seq128"], f"model.init_from={tmp_path / 'bert'}",
        "model.attention_pattern={name: longformer, window: 4}", "train.max_steps=2",
        "model.max_position_embeddings=128",
    )  # fmt: skip
    assert run.model.config.mask_spec.name == "longformer" and run.state.stage == 2
    expected = build_mask({"name": "longformer", "window": 4}, 128, 2)
    assert torch.equal(run.model.current_mask(128)[0], expected)
    theirs = bert.state_dict()
    for name, value in run.model.state_dict().items():
        if name in theirs and value.shape == theirs[name].shape:
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    rows = theirs["bert.embeddings.position_embeddings.weight"]
    extended = run.model.bert.embeddings.position_embeddings.weight.detach()
    assert run.model.config.max_position_embeddings == 128 and extended.shape[0] == 128
    torch.testing.assert_close(extended, torch.cat([rows, rows]), rtol=0, atol=0)
    assert "continuing from" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="model directory without them"):
        _setup(
            tmp_path / "out2",
            corpora["seq128"],
            f"model.init_from={tmp_path / 'bert'}",
            "model.init_optimizer=true",
        )
