"""Position embeddings extended by copying (sparsebert.model.positions), for long-context pre-training."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TINY
from transformers import BertConfig, BertForPreTraining

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.model.positions import extend_position_embeddings

OLD, NEW = TINY["max_position_embeddings"], 160  # 160 = 2.5 copies: a partial last copy too


def _ids(seq_len: int) -> torch.Tensor:
    return torch.randint(
        5, TINY["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(seq_len)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: BertForPreTraining(BertConfig(**TINY)),
        lambda: SparseBertForPreTraining(
            SparseBertConfig(**TINY, attention_pattern={"name": "longformer", "window": 3})
        ),
    ],
    ids=["transformers_bert", "sparsebert_longformer"],
)
def test_rows_are_tiled_buffers_grow_and_a_long_forward_runs(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    old_rows = model.bert.embeddings.position_embeddings.weight.detach().clone()
    with torch.no_grad():
        short_before = model(_ids(40)).prediction_logits
    assert extend_position_embeddings(model, NEW) is model

    rows = model.bert.embeddings.position_embeddings.weight
    assert rows.shape == (NEW, TINY["hidden_size"]) and rows.requires_grad
    for p in range(NEW):
        assert torch.equal(rows[p], old_rows[p % OLD]), p
    assert model.config.max_position_embeddings == NEW
    embeddings = model.bert.embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(NEW)[None])
    assert embeddings.token_type_ids.shape == (1, NEW) and not embeddings.token_type_ids.any()

    with torch.no_grad():
        torch.testing.assert_close(model(_ids(40)).prediction_logits, short_before)  # the first rows are kept
        long = model(_ids(NEW)).prediction_logits
    assert long.shape == (2, NEW, TINY["vocab_size"]) and torch.isfinite(long).all()
    model.train()
    model(_ids(NEW), labels=_ids(NEW), next_sentence_label=torch.tensor([0, 1])).loss.backward()
    assert rows.grad is not None and rows.grad[OLD:].abs().sum() > 0  # the copied rows learn on their own

    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.max_position_embeddings == NEW
    assert torch.equal(loaded.bert.embeddings.position_embeddings.weight, rows)


def test_a_dam_mask_keeps_its_logits_and_follows_its_rule_at_the_new_length(tmp_path):
    torch.manual_seed(0)
    model = SparseBertForPreTraining(SparseBertConfig(**TINY, attention_pattern="dam_s"))
    model(_ids(16))  # searched at 16
    model.freeze_mask()
    extend_position_embeddings(model, NEW)
    assert model.config.attention_pattern["max_len"] == OLD  # α keeps its size
    model.save_pretrained(tmp_path)
    loaded = SparseBertForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.mask_source.alpha, model.mask_source.alpha)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the "searched at 16, used at 160" warning: tested in test_dam_extension
        assert torch.equal(loaded.current_mask(NEW), model.current_mask(NEW))
        assert torch.isfinite(loaded(_ids(NEW)).prediction_logits).all()


def test_shrinking_is_refused_and_the_same_size_is_a_no_op():
    model = BertForPreTraining(BertConfig(**TINY))
    with pytest.raises(
        ValueError, match=f"max_positions must be an integer >= the model's max_position_embeddings {OLD}"
    ):
        extend_position_embeddings(model, OLD - 1)
    table = model.bert.embeddings.position_embeddings
    extend_position_embeddings(model, OLD)
    assert model.bert.embeddings.position_embeddings is table
