"""Memory and speed switches: activation checkpointing (``model.gradient_checkpointing``) and ``torch.compile``
(``train.compile``) change how a step runs, never what it computes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.track.tracker import flatten
from sparsebert.train.build import build_engine, build_model, enable_checkpointing
from sparsebert.train.config import load_config
from sparsebert.train.distributed import deepspeed_config

DAM_SEARCH = {"name": "dam_s", "lambda": 0.01}
PATTERNS = [("dense", "sdpa"), (DAM_SEARCH, "sdpa"), ({"name": "longformer", "window": 2}, "block_sparse")]


def _model(pattern, backend: str, dropout: float = 0.0) -> SparseBertForPreTraining:
    torch.manual_seed(0)
    config = SparseBertConfig(
        **{**TINY, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
        attention_pattern=pattern,
        attention_backend=backend,
    )
    return SparseBertForPreTraining(config).train()


def _step(model, seq_len: int, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one training pass (the Gumbel noise and dropout drawn from ``seed``)."""
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(5, TINY["vocab_size"], (2, seq_len), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, seq_len // 2 :] = 0
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, attention_mask=attention_mask, labels=ids, next_sentence_label=torch.tensor([0, 1]))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a, b, atol: float = 1e-5) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pattern,backend", PATTERNS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(pattern, backend):
    # Dropout on: the recompute replays the forward's random numbers (dropout, not the mask's Gumbel noise, which
    # is drawn once per pass outside the layers), so even the regularised step is the same.
    eager = _model(pattern, backend, dropout=0.1)
    checkpointed = copy.deepcopy(eager)
    enable_checkpointing(checkpointed)
    passes = []
    checkpointed.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *_: passes.append(1))
    for seq_len in (16, 24):
        _assert_same_step(_step(eager, seq_len), _step(checkpointed, seq_len))
    assert len(passes) == 4  # forward + recompute in the backward, at both lengths: checkpointing is on
    if pattern is DAM_SEARCH:
        assert "bert.sparse_mask.alpha" in _step(checkpointed, 16)[1]  # α still learns through the recompute


@pytest.mark.slow  # inductor compiles for about a minute on a shared 2-core CPU
@pytest.mark.parametrize("pattern,backend", [PATTERNS[1], PATTERNS[2]])
def test_compiled_layers_step_like_eager_ones(pattern, backend):
    eager = _model(pattern, backend)
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(backend="inductor")
    for seq_len in (16, 24, 16):
        _assert_same_step(_step(eager, seq_len), _step(compiled, seq_len), atol=1e-4)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    if pattern is DAM_SEARCH:
        # Temperature annealing and the recorded search length act outside the compiled layers.
        eager.mask_temperature = compiled.mask_temperature = 0.3
        _assert_same_step(_step(eager, 24, seed=5), _step(compiled, 24, seed=5), atol=1e-4)
        assert compiled.mask_source.search_length == 24
        compiled.freeze_mask()
        eager.freeze_mask()
        _assert_same_step(_step(eager, 16), _step(compiled, 16), atol=1e-4)
    cached = compiled.mask_source.masks(16)
    assert cached.hard is compiled.mask_source.masks(16).hard  # the fixed mask is still cached per length


def test_both_switches_are_config_keys_applied_by_build_and_logged_as_params():
    config = load_config("tiny_cpu", ["model.gradient_checkpointing=true", "train.compile=true"])
    params = flatten(config.to_dict())  # what pre-training logs to MLflow as the run's params
    assert params["model.gradient_checkpointing"] is True and params["train.compile"] is True
    model = build_model(config, vocab_size=64, pad_token_id=0, ds={})
    layers = model.bert.encoder.layer
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    off = build_model(load_config("tiny_cpu"), vocab_size=64, pad_token_id=0, ds={})
    assert not any(
        layer.gradient_checkpointing or layer._compiled_call_impl for layer in off.bert.encoder.layer
    )


def test_checkpointed_deepspeed_steps_match_plain_ones(process_group, monkeypatch):
    """Two optimizer steps of a DAM search through the real DeepSpeed engine, ZeRO stage 0 and 3 (which gathers
    the parameters again in the recompute), with and without activation checkpointing."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # what the deepspeed launcher sets for a rank
    for ds_file in ("ds_configs/cpu.json", "ds_configs/cpu_zero3.json"):
        losses = {checkpointing: _deepspeed_losses(ds_file, checkpointing) for checkpointing in (False, True)}
        torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5, msg=ds_file)
        assert not torch.equal(losses[True][0], losses[True][1])  # the first step changed the weights


def _deepspeed_losses(ds_file: str, checkpointing: bool) -> torch.Tensor:
    config = load_config(
        "tiny_cpu",
        [f"deepspeed_config={ds_file}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
         "model.max_position_embeddings=32", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
         "model.attention_pattern={name: dam_s, lambda: 0.01}", "train.micro_batch_size=2",
         "train.optimizer=adamw"],
    )  # fmt: skip
    ds = deepspeed_config(config)
    model = build_model(config, vocab_size=64, pad_token_id=0, ds=ds)
    engine, _ = build_engine(model, config, ds)
    assert all(layer.gradient_checkpointing == checkpointing for layer in model.bert.encoder.layer)
    losses = []
    for step in range(2):
        ids = torch.randint(5, 64, (2, 32), generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        out = engine(ids, labels=ids, next_sentence_label=torch.tensor([0, 1]))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach().float())
    engine.destroy()
    return torch.stack(losses)
