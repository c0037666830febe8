"""Optimizers and schedule: parameter groups, α under LAMB, warm-up and decay, freezing α."""

from __future__ import annotations

import pytest
import torch

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.train.config import load_config
from sparsebert.train.optim import DAM_GROUP, build_optimizer, build_scheduler, stop_dam_updates

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _model():
    torch.manual_seed(0)
    return SparseBertForPreTraining(
        SparseBertConfig(
            **TINY, max_position_embeddings=32, attention_pattern={"name": "dam_s", "lambda": 1e-3}
        )
    )


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_alpha_has_its_own_group_and_moves(optimizer):
    model = _model()
    train = load_config("tiny_cpu", [f"train.optimizer={optimizer}", "train.dam_lr=0.01"]).train
    opt = build_optimizer(model, train)
    groups = {g["name"]: g for g in opt.param_groups}
    alpha = model.bert.sparse_mask.alpha
    assert groups[DAM_GROUP]["params"] == [alpha] and groups[DAM_GROUP]["weight_decay"] == 0.0
    assert groups[DAM_GROUP]["lr"] == 0.01
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])  # biases and LayerNorm: no decay
    before = alpha.detach().clone()
    ids = torch.randint(5, 64, (2, 16))
    model(ids, labels=ids, next_sentence_label=torch.tensor([0, 1])).loss.backward()
    opt.step()
    # LAMB's trust ratio would scale α's step by ‖α‖ ≈ 1e-3 · √n: α must take full (Adam) steps instead.
    assert (alpha.detach() - before)[..., :16].abs().mean() > 0.005  # the distances a 16-token input uses


def test_schedule_warms_up_then_decays():
    """The scheduler pre-training runs: warm-up, then linear or polynomial decay; every group from its own peak."""

    def lrs(decay: str) -> list[float]:
        train = load_config(
            "tiny_cpu",
            ["train.warmup_steps=10", "train.max_steps=110", f"train.decay={decay}", "train.lr=1.0"],
        ).train
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)
        scheduler = build_scheduler(opt, train)
        history = []
        for _ in range(111):
            history.append(scheduler.get_last_lr()[0])
            opt.step()
            scheduler.step()
        return history

    linear = lrs("linear")
    assert linear[0] == pytest.approx(0.1) and linear[9] == pytest.approx(1.0)
    assert linear[60] == pytest.approx(0.5) and linear[110] == 0.0
    assert lrs("polynomial")[60] == pytest.approx(0.5**0.5)
    assert set(lrs("constant")[10:]) == {1.0}


def test_stop_dam_updates_keeps_alpha_fixed():
    model = _model()
    train = load_config("tiny_cpu", ["train.optimizer=adamw"]).train
    opt = build_optimizer(model, train)
    scheduler = build_scheduler(opt, train)
    ids = torch.randint(5, 64, (2, 16))
    model(ids, labels=ids, next_sentence_label=torch.tensor([0, 1])).loss.backward()
    opt.step()
    model.freeze_mask()
    stop_dam_updates(opt, scheduler)
    frozen = model.bert.sparse_mask.alpha.detach().clone()
    for _ in range(3):  # momentum from the search must not move α any more
        opt.zero_grad()
        model(ids, labels=ids, next_sentence_label=torch.tensor([0, 1])).loss.backward()
        opt.step()
        scheduler.step()
    assert torch.equal(model.bert.sparse_mask.alpha.detach(), frozen)
