"""The names a config or a command line may choose from, in one place that imports no torch.

Config validation, ``--help-config`` and the command lines read the names here; each name's implementation is
registered where it lives, under the same name: attention backends in :mod:`sparsebert.model.attention` (users add
theirs with ``sparsebert.register_backend``, which extends this list), optimizers in :mod:`sparsebert.train.optim`.
A test checks that every registry and its list of names agree (docs/ARCHITECTURE.md: "Names in one place").
"""

from __future__ import annotations

# "auto" picks one of the others per mask, device and training mode (sparsebert.model.attention.choose_backend).
ATTENTION_BACKENDS: list[str] = ["auto", "eager", "sdpa", "flex", "block_sparse"]
OPTIMIZERS: tuple[str, ...] = ("lamb", "adamw")
LR_DECAYS: tuple[str, ...] = ("linear", "polynomial", "constant")
MLM_LOGITS: tuple[str, ...] = ("masked_only", "all")
# dam.alpha_optimizer: α's own Adam steps at train.dam_lr, or the model's optimizer and lr (sparsebert.train.optim)
ALPHA_OPTIMIZERS: tuple[str, ...] = ("adam", "model")
INIT_MASKS: tuple[str, ...] = (
    "auto",
    "checkpoint",
    "config",
)  # model.init_mask: sparsebert.train.continuation


def check(what: str, value: str, names) -> str:
    """``value`` if it is one of ``names``, else a ``ValueError`` naming ``what`` and the choices."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
    return value
