"""Training helpers shared by pre-training and fine-tuning: seeding, BERT's parameter groups, the LR schedule."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device's generator too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """BERT's rule: biases and LayerNorm weights get no weight decay."""
    return param.ndim < 2 or "LayerNorm" in name


def parameter_groups(named_parameters, weight_decay: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters of ``named_parameters`` by :func:`is_no_decay`."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    return decay, no_decay


# After the warm-up: the LR multiplier as a function of the fraction of decay steps remaining (and the power).
DECAYS = {
    "linear": lambda remaining, power: remaining,
    "polynomial": lambda remaining, power: remaining**power,
    "constant": lambda remaining, power: 1.0,
}


def lr_factor(step: int, warmup: int, total: int, decay: str = "linear", power: float = 1.0) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps: linear warm-up over ``warmup`` steps, then
    ``linear`` or ``polynomial`` (``power``) decay to 0 at ``total``, or ``constant``."""
    if step < warmup:
        return (step + 1) / warmup
    return DECAYS[decay](max(0.0, (total - step) / max(1, total - warmup)), power)


def warmup_decay_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, decay: str = "linear", power: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a scheduler: every group's LR scales from its own peak."""
    if decay not in DECAYS:
        raise ValueError(f"unknown LR decay {decay!r}; choose one of {', '.join(DECAYS)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, decay, power)
    )
