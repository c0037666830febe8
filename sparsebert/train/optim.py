"""Pre-training's optimizers (LAMB, the paper's, and AdamW) over BERT's groups plus DAM's α, and its schedule."""

from __future__ import annotations

import torch
from pytorch_optimizer import Lamb
from torch import nn

from sparsebert import choices
from sparsebert.train.config import DamConfig, TrainConfig
from sparsebert.train.recipe import parameter_groups, warmup_decay_schedule

DAM_GROUP = "dam_alpha"
ALPHA_NAME = "sparse_mask.alpha"  # how a DAM mask's logits are named in a model's parameters


def param_groups(model: nn.Module, train: TrainConfig, dam: DamConfig | None = None) -> list[dict]:
    """Three groups: decayed weights; biases and LayerNorm (no decay, as BERT); DAM α (no decay; its own Adam
    steps at ``train.dam_lr``, or with ``dam.alpha_optimizer=model`` the optimizer's own rule at ``train.lr``)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    alpha = [p for n, p in named if n.endswith(ALPHA_NAME)]
    decay, no_decay = parameter_groups(
        ((n, p) for n, p in named if not n.endswith(ALPHA_NAME)), train.weight_decay
    )
    groups = [
        {"params": decay, "weight_decay": train.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if alpha:
        own = (dam or DamConfig()).alpha_optimizer == "adam"
        lr = (train.dam_lr or train.lr) if own else train.lr
        # "own_steps": plain Adam steps whatever the optimizer (LAMB's trust ratio off), read by _lamb
        groups.append({"params": alpha, "weight_decay": 0.0, "lr": lr, "name": DAM_GROUP, "own_steps": own})
    return groups


def _lamb(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """LAMB with decoupled weight decay, as in the LAMB paper and NVIDIA's BERT recipe. α takes plain Adam
    steps (unless ``dam.alpha_optimizer=model``): the trust ratio ‖w‖/‖update‖ of a parameter that starts near 0
    would keep it there."""
    optimizer = Lamb(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decouple=True)
    for group in optimizer.param_groups:  # Lamb's constructor resets the per-group `adam` flag
        group["adam"] = group["name"] == DAM_GROUP and group["own_steps"]
    return optimizer


def _adamw(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps)


# train.optimizer → builder over the parameter groups; the names live in sparsebert.choices.OPTIMIZERS.
OPTIMIZERS = {"lamb": _lamb, "adamw": _adamw}


def build_optimizer(
    model: nn.Module, train: TrainConfig, guarded: bool = False, dam: DamConfig | None = None
) -> torch.optim.Optimizer:
    """``train.optimizer`` over :func:`param_groups`; ``guarded``: wrapped in :class:`GuardedSteps` (which leaves
    α's gradient unclipped with ``dam.clip_alpha`` false)."""
    dam = dam or DamConfig()
    optimizer = OPTIMIZERS[choices.check("train.optimizer", train.optimizer, list(OPTIMIZERS))](
        param_groups(model, train, dam), train
    )
    return GuardedSteps(optimizer, train.grad_clip, clip_alpha=dam.clip_alpha) if guarded else optimizer


class GuardedSteps(torch.optim.Optimizer):
    """What DeepSpeed's ZeRO and fp16 optimizers do and a plain torch optimizer under ZeRO stage 0 does not:
    clip the gradients (keeping their norm before clipping, which the engine reports), and skip a step whose
    gradients hold inf or NaN, saying so as DeepSpeed's own optimizers do (``overflow``) — DeepSpeed then
    leaves the LR schedule where it is and counts the step as skipped. Without it, one bad batch writes NaN
    into every weight. The gradients are already averaged over ranks when ``step`` runs, so all ranks agree."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, clip_alpha: bool = True):
        self.optimizer = optimizer  # the wrapped one owns all state
        self.max_norm = max_norm if max_norm > 0 else float("inf")
        self.clip_alpha = clip_alpha  # False: DAM α's gradient is left out of the clipped (and reported) norm
        self.overflow = False
        self._global_grad_norm: torch.Tensor | None = None  # read by the DeepSpeed engine after each step

    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    @torch.no_grad()
    def step(self, closure=None):
        clipped, apart = [], []
        for group in self.param_groups:
            unclipped = group.get("name") == DAM_GROUP and not self.clip_alpha
            (apart if unclipped else clipped).extend(p for p in group["params"] if p.grad is not None)
        self._global_grad_norm = torch.nn.utils.clip_grad_norm_(clipped, self.max_norm)
        finite = bool(self._global_grad_norm.isfinite()) and all(bool(p.grad.isfinite().all()) for p in apart)
        self.overflow = not finite
        return None if self.overflow else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None = None):
    """Warm-up, then ``train.decay`` to 0 at ``total_steps`` (default ``train.max_steps``)."""
    total = total_steps or train.max_steps
    return warmup_decay_schedule(optimizer, train.warmup_steps, total, train.decay, train.poly_power)


def stop_dam_updates(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """After the freeze, α keeps its place in the optimizer (so checkpoints keep one layout) at lr 0.

    With lr 0 neither AdamW nor LAMB moves α, so the frozen mask 1[α > 0] cannot drift.
    """
    for index, group in enumerate(optimizer.param_groups):
        if group.get("name") == DAM_GROUP:
            group["lr"] = 0.0
            scheduler.base_lrs[index] = 0.0
