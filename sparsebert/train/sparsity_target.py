"""A DAM search steered to the sparsity a user names (``dam.target_sparsity``) rather than by a fixed λ.

λ·‖M‖₁'s effect on the sparsity a search ends at is far from linear (on the demo corpus λ = 1e-3 drops every
position, 1e-4 about 80%), so hitting a sparsity would take a sweep of whole pre-trainings. Instead, as
structured pruning does, the sparsity is a constraint and λ its Lagrange multiplier: the loss
holds λ·(E[density] − d_t), with E[density] = mean σ(α) the expected density of the sampled masks (a sampled
position is kept with probability σ(α)), and λ follows the constraint's gap g = E[density] − d_t, a PI
controller:

    λ_I ← λ_I + lambda_lr · g   (gradient ascent on the multiplier, after each step)
    λ   = λ_I + lambda_gain · g (the λ in force for the next step)

λ grows while the mask is denser than the goal and shrinks (below 0 if need be: an equality constraint) while it
is sparser. The running part alone (plain ascent) oscillates: α follows λ with a lag (an Adam step of about
``dam_lr`` per step), so λ keeps climbing while the density is already on its way and overshoots; the
proportional part flips λ's push as soon as the gap changes sign, and the running part only removes what is left
of the gap at equilibrium. Both gains are in units of λ per unit of density gap; the defaults hold the gap
within ~0.01 on a toy problem whose task gradients span a factor of 400 (``tests/test_sparsity_target.py``).
The goal d_t starts at the density every search starts at (½: α ≈ 0) and moves linearly to 1 − target over the
first ``dam.target_warmup`` of the search, slowly enough for α to follow. λ_I and the last gap are the run's state
(``TrainState.dam_lambda``, ``dam_gap``, checkpointed); λ in force is logged every ``log_every`` steps
(``dam_lambda``) with the expected sparsity and the goal's.

The search then ends at an expected density near the goal, but the frozen mask is 1[α > 0], and α near 0 can
fall either side; so at the freeze α is shifted by the θ that makes 1[α > θ] meet the target
(``SparseBertForPreTraining.freeze_mask(target_sparsity=...)``); the sparsity of 1[α > 0] before the shift and θ
are logged, showing how much the shift had to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsebert.train.config import DamConfig

START_DENSITY = 0.5  # every α starts near 0, so every position is kept with probability ≈ ½


@dataclass(frozen=True)
class SparsityTarget:
    """The goal density of each search step and λ's controller (``dam.target_sparsity``, ``dam.lambda_lr``,
    ``dam.lambda_gain``, ``dam.target_warmup`` over a search of ``search_steps``)."""

    target_sparsity: float
    lambda_lr: float
    lambda_gain: float
    warmup_steps: int

    @classmethod
    def of(cls, dam: DamConfig, search_steps: int) -> SparsityTarget | None:
        """The target a config asks for, or None (the pattern's fixed λ)."""
        if dam.target_sparsity is None:
            return None
        warmup = round(dam.target_warmup * search_steps)
        return cls(dam.target_sparsity, dam.lambda_lr, dam.lambda_gain, warmup)

    def goal(self, step: int) -> float:
        """The density the search aims at during step ``step + 1``."""
        final = 1.0 - self.target_sparsity
        progress = 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        return START_DENSITY + (final - START_DENSITY) * progress

    def in_force(self, lam: float, gap: float) -> float:
        """λ for the next step, from the running part ``lam`` and the last step's ``gap``."""
        return lam + self.lambda_gain * gap

    def after_step(self, lam: float, step: int, density: float) -> tuple[float, float]:
        """(running part, gap) after step ``step + 1``, whose expected density was ``density``."""
        gap = density - self.goal(step)
        return lam + self.lambda_lr * gap, gap


def steer(model, target: SparsityTarget | None, lam: float, gap: float, step: int) -> None:
    """Before a search step: the model's loss term aims at this step's goal with the λ in force."""
    if target is not None:
        model.steer_mask(target.in_force(lam, gap), target.goal(step))


def metrics(model, target: SparsityTarget | None, lam: float, gap: float, step: int) -> dict[str, float]:
    """What a log of the search reports about the target: λ in force, the expected sparsity and the goal's."""
    density = model.expected_mask_density
    if target is None or density is None:
        return {}
    goal = target.goal(max(step - 1, 0))  # the goal of the step just done
    return {
        "dam_lambda": target.in_force(lam, gap),
        "expected_sparsity": 1.0 - density,
        "target_sparsity": 1 - goal,
    }
