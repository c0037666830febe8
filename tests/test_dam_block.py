"""Block-structured DAM (``dam_b``): one logit per head and block pair, so the frozen mask is block-sparse by
construction; it searches, freezes, exports, and ``auto`` serves it with a block-skipping backend."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from sparsebert import SparseBertConfig, SparseBertForMaskedLM
from sparsebert.model.dam_logits import expand_alpha, expected_density, threshold_for
from sparsebert.model.masks import build_mask, padded_blocks, parse_spec, sparsity

SEQ = 64


def _model(**pattern) -> SparseBertForMaskedLM:
    torch.manual_seed(0)
    spec = {"name": "dam_b", "block": 16, **pattern}
    return SparseBertForMaskedLM(SparseBertConfig(**TINY, attention_pattern=spec))


def _constant_on_blocks(mask: torch.Tensor, block: int) -> bool:
    tiles = padded_blocks(mask.flatten(0, -3), block)  # [H, n, b, n, b]
    return bool((tiles == tiles[:, :, :1, :, :1]).all())


def test_the_block_parameter_is_checked():
    assert parse_spec("dam_b").params["block"] == 128
    with pytest.raises(ValueError, match="block"):
        parse_spec({"name": "dam_b", "block": 0})
    with pytest.raises(ValueError, match="share_heads"):
        parse_spec({"name": "dam_b", "share_heads": "yes"})


@pytest.mark.parametrize("share_heads", [False, True])
def test_dam_b_searches_freezes_and_exports_a_block_sparse_mask(tmp_path, share_heads):
    model = _model(share_heads=share_heads)
    heads = 1 if share_heads else TINY["num_attention_heads"]
    assert model.mask_source.alpha.shape == (1, heads, 4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    ids = torch.randint(5, TINY["vocab_size"], (4, SEQ))
    before = model.mask_source.alpha.detach().clone()
    for _ in range(3):
        out = model(ids, labels=ids)
        assert out.mask_penalty is not None
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, model.mask_source.alpha.detach())  # α learns
    sampled = model.bert.masks_for(ids, None).hard
    assert _constant_on_blocks(sampled, 16)  # one sample per block pair

    model.freeze_mask(target_sparsity=0.5)
    mask = model.current_mask(SEQ)
    assert _constant_on_blocks(mask, 16) and abs(sparsity(mask) - 0.5) <= 1 / 16
    model.save_pretrained(tmp_path)
    loaded = SparseBertForMaskedLM.from_pretrained(tmp_path)
    assert loaded.mask_frozen and torch.equal(loaded.current_mask(SEQ), mask)


def test_auto_serves_a_frozen_dam_b_mask_with_a_block_skipping_backend():
    model = _model(share_heads=True)
    with torch.no_grad():
        model.mask_source.alpha.fill_(-1.0)
        model.mask_source.alpha[..., range(4), range(4)] = 1.0  # the diagonal blocks: 1/4 of the work
    model.freeze_mask()
    assert model.attention_in_force(SEQ, training=True)[0] == "block_sparse"
    assert model.attention_in_force(SEQ, training=False)[0] == "block_sparse"  # CPU: no flex
    searching = _model(share_heads=True)
    assert searching.attention_in_force(SEQ, training=True)[0] == "sdpa"  # a search needs a soft mask


def test_dam_b_extends_block_by_block_and_build_mask_takes_its_logits():
    alpha = torch.randn(1, 2, 4, 4)
    logits = expand_alpha("dam_b", alpha, 96, searched_len=64, block=16)  # two more blocks than searched
    assert logits.shape == (1, 2, 96, 96) and _constant_on_blocks(logits > 0, 16)
    spec = {"name": "dam_b", "block": 16, "alpha": alpha[0, 0]}
    assert torch.equal(build_mask(spec, 64, 3)[0], expand_alpha("dam_b", alpha[0, 0], 64, block=16) > 0)


@pytest.mark.parametrize("name", ["dam_u", "dam_s", "dam_b"])
def test_expected_density_and_threshold_count_every_position(name):
    torch.manual_seed(0)
    shape = {"dam_u": (1, 2, 40, 40), "dam_s": (1, 2, 40), "dam_b": (1, 2, 3, 3)}[name]
    alpha = torch.randn(shape)
    full = expand_alpha(name, alpha, 40, block=16)  # 40 = two whole blocks and a partial one
    assert expected_density(name, alpha, 40, 16).item() == pytest.approx(torch.sigmoid(full).mean().item())
    for target in (0.3, 0.8):
        theta = threshold_for(name, alpha, 40, target, 16)
        got = 1 - (full > theta).float().mean().item()
        assert abs(got - target) < 0.08  # as close as the logits' granularity allows
