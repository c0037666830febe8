"""Fault injection for the end-to-end tests, behind one switch: the ``SPARSEBERT_FAULTS`` environment variable.

Tests drive the real failure paths with it (a killed rank, a non-finite loss, a failing fine-tuning job), with
nothing mocked. Unset, no fault exists. The value is ``name=value`` pairs separated by ``;``:

* ``crash_after_step=N`` — pre-training: rank 0 kills itself (SIGKILL) right after step N (and its checkpoint);
* ``nonfinite_at_step=N`` — pre-training: rank 0's loss is made infinite once, in the first attempt at step N;
* ``nonfinite_from_step=N`` — pre-training: rank 0's loss is infinite in every attempt from step N on;
* ``sigterm_at_step=N`` — pre-training: the last rank sends itself SIGTERM after step N (preemption);
* ``eval_fail=TASK[:N],...`` — evaluation: attempts of TASK's jobs fail (all of them, or the first N).
"""

from __future__ import annotations

import os

ENV = "SPARSEBERT_FAULTS"
KNOWN = ("crash_after_step", "nonfinite_at_step", "nonfinite_from_step", "sigterm_at_step", "eval_fail")


def fault(name: str) -> str | None:
    """The value of fault ``name`` in ``$SPARSEBERT_FAULTS``, or None."""
    if name not in KNOWN:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(KNOWN)}")
    for part in filter(None, (p.strip() for p in os.environ.get(ENV, "").split(";"))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in KNOWN:
            raise ValueError(f"{ENV}: {part!r} is not one of {', '.join(k + '=...' for k in KNOWN)}")
        if key.strip() == name:
            return value.strip()
    return None


def step_fault(name: str) -> int:
    """A step-valued fault (0 when unset)."""
    value = fault(name)
    return int(value) if value else 0


class StepFaults:
    """The pre-training faults of this rank, read once: the trainer asks it for the loss of each attempt and calls
    it after each step, so the training loop holds no fault logic of its own."""

    def __init__(self, rank: int, world_size: int):
        first, last = rank == 0, rank == world_size - 1
        self.poison_at = step_fault("nonfinite_at_step") if first else 0
        self.poison_from = step_fault("nonfinite_from_step") if first else 0
        self.crash_after = step_fault("crash_after_step") if first else 0
        self.sigterm_after = step_fault("sigterm_at_step") if last else 0

    def loss(self, loss, step: int):
        """``loss`` of an attempt at ``step``, made infinite where a fault says so (the skipped-step path)."""
        poisoned = step == self.poison_at or 0 < self.poison_from <= step
        if step == self.poison_at:
            self.poison_at = 0  # once: the retried step is finite
        return loss * float("inf") if poisoned else loss

    def after_step(self, step: int) -> None:
        """Right after ``step`` (and its checkpoint): a SIGKILL (the resume path) or a SIGTERM (preemption)."""
        import signal

        if step and step == self.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if step and step == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
