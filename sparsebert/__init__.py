"""SparseBERT: BERT pre-training with sparse attention masks and Differentiable Attention Mask search.

The public names load on first use (PEP 562), so that ``--help`` and config errors of the entry points answer
before torch, transformers or DeepSpeed are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "SparseBertConfig": "sparsebert.modeling",
    "SparseBertForMaskedLM": "sparsebert.modeling",
    "SparseBertForPreTraining": "sparsebert.modeling",
    "SparseBertForQuestionAnswering": "sparsebert.modeling",
    "SparseBertForSequenceClassification": "sparsebert.modeling",
    "SparseBertModel": "sparsebert.modeling",
    "available_patterns": "sparsebert.masks",
    "build_mask": "sparsebert.masks",
    "register_pattern": "sparsebert.masks",
    "sparsity": "sparsebert.masks",
    "register_backend": "sparsebert.attention",
    "extend_position_embeddings": "sparsebert.positions",
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
    from sparsebert.attention import register_backend
    from sparsebert.masks import available_patterns, build_mask, register_pattern, sparsity
    from sparsebert.modeling import (
        SparseBertConfig,
        SparseBertForMaskedLM,
        SparseBertForPreTraining,
        SparseBertForQuestionAnswering,
        SparseBertForSequenceClassification,
        SparseBertModel,
    )
    from sparsebert.positions import extend_position_embeddings


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sparsebert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
