"""SparseBERT: BERT pre-training with sparse attention masks and Differentiable Attention Mask search."""

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

__all__ = [
    "SparseBertConfig",
    "SparseBertForMaskedLM",
    "SparseBertForPreTraining",
    "SparseBertForQuestionAnswering",
    "SparseBertForSequenceClassification",
    "SparseBertModel",
    "available_patterns",
    "build_mask",
    "register_backend",
    "register_pattern",
    "sparsity",
]
