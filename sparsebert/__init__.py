"""SparseBERT: BERT pre-training with sparse attention masks and Differentiable Attention Mask search.

The public names load on first use (PEP 562), so that ``--help`` and config errors of the entry points answer
before torch, transformers or DeepSpeed are imported. For the same reason the model classes join transformers' Auto
classes when transformers loads (:mod:`sparsebert.model.registration`): after ``import sparsebert``,
``AutoModelForMaskedLM.from_pretrained(dir)`` and ``pipeline("fill-mask", model=dir)`` load a SparseBERT folder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sparsebert.model import registration as _registration

_registration.install()

_PUBLIC = {
    "SparseBertConfig": "sparsebert.model.modeling",
    "SparseBertForMaskedLM": "sparsebert.model.modeling",
    "SparseBertForPreTraining": "sparsebert.model.modeling",
    "SparseBertForQuestionAnswering": "sparsebert.model.modeling",
    "SparseBertForSequenceClassification": "sparsebert.model.modeling",
    "SparseBertModel": "sparsebert.model.modeling",
    "available_patterns": "sparsebert.model.masks",
    "build_mask": "sparsebert.model.masks",
    "register_pattern": "sparsebert.model.masks",
    "sparsity": "sparsebert.model.masks",
    "register_backend": "sparsebert.model.attention",
    "extend_position_embeddings": "sparsebert.model.positions",
}

__all__ = [
    "SparseBertConfig",
    "SparseBertForMaskedLM",
    "SparseBertForPreTraining",
    "SparseBertForQuestionAnswering",
    "SparseBertForSequenceClassification",
    "SparseBertModel",
    "available_patterns",
    "build_mask",
    "extend_position_embeddings",
    "register_backend",
    "register_pattern",
    "sparsity",
]

if TYPE_CHECKING:
    from sparsebert.model.attention import register_backend
    from sparsebert.model.masks import available_patterns, build_mask, register_pattern, sparsity
    from sparsebert.model.modeling import (
        SparseBertConfig,
        SparseBertForMaskedLM,
        SparseBertForPreTraining,
        SparseBertForQuestionAnswering,
        SparseBertForSequenceClassification,
        SparseBertModel,
    )
    from sparsebert.model.positions import extend_position_embeddings


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sparsebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
