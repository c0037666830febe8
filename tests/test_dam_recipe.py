"""The α recipe as config (α's optimizer group, clipping, a search to the end), importance with its spread, and
one launch of the steerable DAM end to end: a dam_b search aimed at a sparsity on a corpus whose documents are
kept apart, recorded in MLflow."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import REPO
from mlflow.tracking import MlflowClient

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.track.importance import across_runs, distance_profile, rank_interval, rank_of
from sparsebert.train.config import ConfigError, load_config
from sparsebert.train.distributed import deepspeed_config
from sparsebert.train.optim import DAM_GROUP, GuardedSteps, build_optimizer

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _model():
    torch.manual_seed(0)
    pattern = {"name": "dam_s", "lambda": 1e-3}
    return SparseBertForPreTraining(
        SparseBertConfig(**TINY, max_position_embeddings=32, attention_pattern=pattern)
    )


def _groups(*overrides: str) -> dict[str, dict]:
    config = load_config("tiny_cpu", ["train.optimizer=lamb", *overrides])
    optimizer = build_optimizer(_model(), config.train, dam=config.dam)
    return {group["name"]: group for group in optimizer.param_groups}


def test_alpha_takes_its_own_adam_steps_or_the_models_rule():
    own = _groups("train.dam_lr=0.01")[DAM_GROUP]
    assert own["adam"] and own["lr"] == 0.01  # plain Adam at train.dam_lr: LAMB's trust ratio off
    model = _groups("dam.alpha_optimizer=model", "train.dam_lr=null", "train.lr=0.002")[DAM_GROUP]
    assert not model["adam"] and model["lr"] == 0.002  # LAMB's own rule at the model's rate (authors' code)


@pytest.mark.parametrize("clip_alpha", [True, False])
def test_clipping_covers_alpha_or_leaves_it_alone(clip_alpha):
    model = _model()
    config = load_config("tiny_cpu", ["train.grad_clip=1.0", f"dam.clip_alpha={clip_alpha}"])
    optimizer = build_optimizer(model, config.train, guarded=True, dam=config.dam)
    assert isinstance(optimizer, GuardedSteps)
    alpha = model.bert.sparse_mask.alpha
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    alpha.grad = torch.full_like(alpha, 10.0)  # α's gradient alone is far above the clip
    optimizer.step()
    if clip_alpha:
        assert float(optimizer._global_grad_norm) > 10  # the norm α dominates, so everything is scaled down
    else:
        assert float(optimizer._global_grad_norm) < 1  # α is outside the clipped norm...
        assert torch.equal(alpha.grad, torch.full_like(alpha, 10.0))  # ...and its gradient untouched


def test_unclipped_alpha_is_refused_where_deepspeed_clips_itself():
    config = load_config("tiny_cpu", ["deepspeed_config=ds_configs/cpu_zero2.json", "dam.clip_alpha=false"])
    with pytest.raises(ConfigError, match=r"dam\.clip_alpha=false needs ZeRO stage 0"):
        deepspeed_config(config)


def test_importance_comes_with_its_spread_and_the_rank_with_an_interval():
    torch.manual_seed(0)
    seq = 16
    noise = torch.rand(2, 4, seq, seq)  # no distance differs from another but by noise
    profile = distance_profile(noise)
    assert profile.mean.shape == (seq,) and bool((profile.spread > 0.2).all())
    rank, low, high = rank_interval(noise, distance=0, draws=100)
    assert low <= rank <= high and high - low > seq / 4  # noise: the diagonal's rank is anywhere
    signal = noise * 0.1 + torch.eye(seq)  # the diagonal clearly most important
    rank, low, high = rank_interval(signal, distance=0, draws=100)
    assert rank == low == high == seq
    assert rank_of(torch.tensor([0.3, 0.1, 0.3, 0.5]), 0) == 2.5  # ties share the mean rank
    mean, between = across_runs([distance_profile(noise), distance_profile(signal)])
    assert mean[0] > mean[1] and between[0] > between[1]


@pytest.mark.slow
def test_a_steered_block_search_on_separate_documents_end_to_end(tmp_path, ray_local):
    """2 CPU ranks under the deepspeed launcher: dam_b aimed at 75% sparsity, α in the model's optimizer and
    unclipped, documents kept apart; MLflow holds the recipe, λ's trajectory and the frozen sparsity; the exported
    mask is block-sparse and served by block_sparse."""
    from data_prep import prepare_corpus

    text = " ".join(f"Word{i % 37} runs{i % 11} here{i % 5}." for i in range(3000))
    (tmp_path / "docs.txt").write_text("\n\n".join(text[i : i + 900] for i in range(0, len(text), 900)))
    prepare_corpus(
        [tmp_path / "docs.txt"], tmp_path / "corpus", vocab_size=200, seq_len=64, seed=0, shard_size=64,
        progress=False, validation_fraction=0.1, packing="full_sentences",
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", "29731", str(REPO / "sparsebert" / "pretrain.py"),
        "--config", "tiny_cpu", f"output_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'corpus'}",
        "model.attention_pattern={name: dam_b, block: 16, share_heads: true}", "train.max_steps=30",
        "dam.search_steps=20", "dam.target_sparsity=0.75", "dam.alpha_optimizer=model", "train.dam_lr=null",
        "dam.clip_alpha=false", "data.nsp=false", "data.document_mask=true", "train.micro_batch_size=4",
        "train.warmup_steps=2", "train.log_every=2", "eval.every=0", "checkpoint.every=0",
        "mlflow.experiment=steered",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("steered").experiment_id])[0]
    params, metrics = run.data.params, run.data.metrics
    assert params["dam.alpha_optimizer"] == "model" and params["dam.clip_alpha"] == "False"
    assert params["dam.target_sparsity"] == "0.75" and params["data.document_mask"] == "True"
    assert params["attention.stage2.backend"] == "block_sparse"
    lambdas = client.get_metric_history(run.info.run_id, "dam_lambda")
    assert len(lambdas) >= 5 and len({m.value for m in lambdas}) > 1  # λ's trajectory, moving
    assert abs(metrics["frozen_sparsity"] - 0.75) <= 0.02
    model = SparseBertForPreTraining.from_pretrained(tmp_path / "run" / "final")
    mask = model.current_mask(64)
    tiles = mask.view(*mask.shape[:-2], 4, 16, 4, 16)
    assert bool((tiles == tiles[..., :1, :, :1]).all())  # block-sparse by construction
