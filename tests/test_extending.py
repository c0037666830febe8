"""docs/ARCHITECTURE.md's recipes, done from outside the package: a new attention backend (a new pattern is in
tests/test_masks.py, a new task in tests/test_eval_local.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY

from sparsebert import SparseBertConfig, SparseBertModel, choices, register_backend
from sparsebert.model import attention
from sparsebert.train.config import ConfigError, load_config


def masked_softmax_attention(module, query, key, value, masks, slot, padding, scaling, dropout):
    """A plain backend: scores, the layer's fixed mask and the padding, softmax (no empty-row handling)."""
    scores = query @ key.transpose(-1, -2) * scaling
    allowed = masks.hard[slot].unsqueeze(0)
    if padding is not None:
        allowed = allowed & padding
    probs = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return F.dropout(probs, dropout, module.training) @ value


@pytest.fixture
def registered():
    register_backend("masked_softmax", masked_softmax_attention)
    yield "masked_softmax"
    del attention._BACKENDS["masked_softmax"]
    choices.ATTENTION_BACKENDS.remove("masked_softmax")


def test_a_backend_registered_from_outside_runs_and_configs_may_name_it(registered):
    with pytest.raises(ConfigError, match=r"model\.attention_backend"):
        load_config("tiny_cpu", ["model.attention_backend=not_registered"])
    assert (
        load_config("tiny_cpu", [f"model.attention_backend={registered}"]).model.attention_backend
        == registered
    )

    torch.manual_seed(0)
    model = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern="star", attention_backend=registered)
    ).eval()
    ids = torch.randint(5, TINY["vocab_size"], (2, 24))
    padded = torch.ones_like(ids)
    padded[1, 20:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=padded).last_hidden_state
        model.config.attention_backend = "eager"
        reference = model(ids, attention_mask=padded).last_hidden_state
    torch.testing.assert_close(ours, reference)
    with pytest.raises(ValueError, match="exists already"):
        register_backend(registered, masked_softmax_attention)
