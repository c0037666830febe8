"""DAM beyond its searched length: the extension rule, its record in the checkpoint, and its warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TINY

from sparsebert import SparseBertConfig, SparseBertForPreTraining, SparseBertForQuestionAnswering
from sparsebert.model.masks import alpha_to_mask, expand_alpha

SEARCHED = 8


def _searched_model(name: str, max_len: int = 48) -> SparseBertForPreTraining:
    """A model whose DAM mask was searched at length SEARCHED, with distinct logits everywhere, then frozen."""
    torch.manual_seed(0)
    model = SparseBertForPreTraining(
        SparseBertConfig(**TINY, attention_pattern={"name": name, "max_len": max_len})
    )
    model(torch.randint(5, TINY["vocab_size"], (2, SEARCHED)))  # one search pass at SEARCHED tokens
    with torch.no_grad():
        model.mask_source.alpha.normal_()  # α of both signs, so the rule is visible in the mask
    model.freeze_mask()
    return model


def _quiet_mask(model, seq_len: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.current_mask(seq_len)[0]


def test_dam_s_beyond_search_takes_the_farthest_searched_distance():
    model = _searched_model("dam_s")
    alpha = model.mask_source.alpha.detach()[0]  # [heads, max_len]
    assert model.mask_source.search_length == SEARCHED and model.config.dam_searched_len == SEARCHED
    mask = _quiet_mask(model, 30)
    for i in range(30):
        for j in range(30):
            d = abs(i - j)
            expected = alpha[:, min(d, SEARCHED - 1)] > 0
            assert torch.equal(mask[:, i, j], expected), (i, j)
    assert torch.equal(mask[:, :SEARCHED, :SEARCHED], alpha_to_mask("dam_s", alpha, SEARCHED))
    assert torch.equal(_quiet_mask(model, SEARCHED), alpha_to_mask("dam_s", alpha, SEARCHED))


def test_dam_u_beyond_search_takes_the_mean_of_the_diagonal_with_the_same_offset():
    model = _searched_model("dam_u")
    alpha = model.mask_source.alpha.detach()[0]  # [heads, max_len, max_len]
    square = alpha[:, :SEARCHED, :SEARCHED]
    logits = expand_alpha("dam_u", alpha, 20, SEARCHED)
    for i in range(20):
        for j in range(20):
            if i < SEARCHED and j < SEARCHED:
                expected = square[:, i, j]
            else:
                k = max(-(SEARCHED - 1), min(SEARCHED - 1, i - j))
                expected = torch.diagonal(square, offset=-k, dim1=-2, dim2=-1).mean(-1)
            torch.testing.assert_close(logits[:, i, j], expected, msg=f"({i}, {j})")
    assert torch.equal(_quiet_mask(model, 20), logits > 0)
    assert torch.equal(_quiet_mask(model, 20)[:, :SEARCHED, :SEARCHED], square > 0)


@pytest.mark.parametrize("name", ["dam_s", "dam_u"])
def test_the_rule_never_reads_the_untrained_logits(name):
    model = _searched_model(name)
    before = _quiet_mask(model, 40)
    with torch.no_grad():  # α beyond the searched length never took a step: whatever it holds must not matter
        if name == "dam_s":
            model.mask_source.alpha[..., SEARCHED:] = -torch.sign(model.mask_source.alpha[..., SEARCHED:]) * 5
        else:
            model.mask_source.alpha[..., SEARCHED:, :] = 7.0
            model.mask_source.alpha[..., :, SEARCHED:] = -7.0
    model.mask_source.freeze()  # drop the cached masks
    assert torch.equal(_quiet_mask(model, 40), before)


@pytest.mark.parametrize("name", ["dam_s", "dam_u"])
def test_one_warning_names_both_lengths(name):
    model = _searched_model(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.current_mask(SEARCHED)
        ids = torch.randint(5, TINY["vocab_size"], (1, 24))
        model(ids)
        model(ids)
        model.current_mask(24)
    messages = [str(w.message) for w in caught if "searched at length" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(
        f"the {name} mask was searched at length {SEARCHED} and is used at length 24"
    )


def test_search_length_is_saved_and_fine_tuning_at_a_longer_length_uses_the_rule(tmp_path):
    model = _searched_model("dam_s", max_len=16)
    model.save_pretrained(tmp_path)
    expected = _quiet_mask(model, 40)  # beyond max_len too: the rule covers any length
    qa = SparseBertForQuestionAnswering.from_pretrained(tmp_path)
    assert qa.config.dam_searched_len == SEARCHED and qa.mask_source.search_length == SEARCHED
    with pytest.warns(UserWarning, match=f"searched at length {SEARCHED} and is used at length 40"):
        out = qa(torch.randint(5, TINY["vocab_size"], (2, 40)))
    assert torch.isfinite(out.start_logits).all()
    assert torch.equal(qa.current_mask(40)[0], expected)


def test_search_passes_extend_the_searched_length_and_a_search_beyond_max_len_is_refused():
    model = SparseBertForPreTraining(
        SparseBertConfig(**TINY, attention_pattern={"name": "dam_s", "max_len": 16})
    )
    assert model.mask_source.search_length == 0
    for seq_len in (12, 6):
        model(torch.randint(5, TINY["vocab_size"], (1, seq_len)))
    assert model.mask_source.search_length == 12
    with pytest.raises(ValueError, match="sequence length 17 exceeds the DAM mask's max_len 16"):
        model(torch.randint(5, TINY["vocab_size"], (1, 17)))
