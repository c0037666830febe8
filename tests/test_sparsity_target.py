"""dam.target_sparsity: λ as a Lagrange multiplier that brings a search's expected density to the goal."""

from __future__ import annotations

import pytest
import torch

from sparsebert.model.dam import DamMask
from sparsebert.model.dam_logits import distance_matrix
from sparsebert.model.masks import parse_spec
from sparsebert.train.config import ConfigError, DamConfig, load_config
from sparsebert.train.sparsity_target import SparsityTarget

SEQ = 24


def _search(target: float, steps: int = 300) -> tuple[float, float, list[float]]:
    """A dam_s mask whose task rewards keeping distance d with a weight falling 400-fold from d = 0 to the
    farthest, steered by the controller with its default gains: (final expected density, its goal, λ in force
    at every step)."""
    torch.manual_seed(0)
    mask = DamMask(parse_spec("dam_s"), num_heads=4, num_layers=1, max_len=SEQ).train()
    reward = torch.logspace(0, -2.6, SEQ)[distance_matrix(SEQ)]
    optimizer = torch.optim.Adam(mask.parameters(), lr=1e-2)  # train.dam_lr's default
    control = SparsityTarget.of(DamConfig(target_sparsity=target), steps)
    lam = gap = 0.0
    lambdas = []
    for step in range(steps):
        lambdas.append(control.in_force(lam, gap))
        mask.steer(lambdas[-1], control.goal(step))
        masks = mask.masks(SEQ)
        (-(masks.soft[0] * reward).mean() + masks.penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        lam, gap = control.after_step(lam, step, float(mask.last_density))
    return float(mask.last_density), control.goal(steps - 1), lambdas


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_the_controller_brings_the_expected_density_to_the_target(target):
    density, goal, lambdas = _search(target)
    assert goal == pytest.approx(1 - target)
    assert abs(density - goal) < 0.02
    # λ is a multiplier, not a constant: it moved, and ended up positive (the task alone keeps more)
    assert max(lambdas) > 0 and len(set(lambdas)) > 10


def test_the_goal_moves_from_the_start_to_the_target_over_the_warmup():
    control = SparsityTarget.of(DamConfig(target_sparsity=0.9, target_warmup=0.5), 100)
    assert control.goal(0) == pytest.approx(0.5) and control.goal(25) == pytest.approx(0.3)
    assert control.goal(50) == pytest.approx(0.1) == control.goal(99)
    assert SparsityTarget.of(DamConfig(), 100) is None  # no target: the pattern's fixed λ


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dam.target_sparsity=1.5"], "'dam.target_sparsity' must be between 0 and 1"),
        (["dam.target_sparsity=0.9", "model.attention_pattern=dense"], "does not search"),
        (["dam.target_warmup=2"], "'dam.target_warmup' must be between 0 and 1"),
        (["dam.lambda_gain=-1"], "'dam.lambda_gain' must be >= 0"),
        (["dam.alpha_optimizer=model", "train.dam_lr=0.01"], "'train.dam_lr' must be null"),
        (["dam.freeze=false", "dam.search_steps=5"], "'dam.search_steps' must be null with dam.freeze"),
        (["dam.alpha_optimizer=sgd"], "'dam.alpha_optimizer' must be one of adam, model"),
    ],
)
def test_bad_target_and_recipe_keys_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", overrides)


def test_a_search_to_the_end_spans_the_run():
    config = load_config("tiny_cpu", ["dam.freeze=false"])
    assert config.search_steps == config.train.max_steps
