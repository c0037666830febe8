"""SparseBert models: dense parity with transformers, masks honoured, backends agree, save/load, Auto classes."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY
from transformers import AutoModel, AutoModelForPreTraining, BertConfig, BertForPreTraining, BertModel

from sparsebert import (
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForPreTraining,
    SparseBertForQuestionAnswering,
    SparseBertForSequenceClassification,
    SparseBertModel,
    build_mask,
)

BACKENDS = ["eager", "sdpa", "flex", "block_sparse"]


pytestmark = pytest.mark.usefixtures("uncompiled_flex")  # test_compiled_flex_matches compiles once


def _batch(batch=3, seq_len=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (batch, seq_len), generator=g)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1:, 13:] = 0
    attention_mask[2:, 4:] = 0
    return ids, attention_mask


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_bert")
    BertForPreTraining(BertConfig(**TINY)).save_pretrained(path)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_transformers_bert_padded(bert_dir, backend):
    ref = BertModel.from_pretrained(bert_dir).eval()
    ours = SparseBertModel.from_pretrained(bert_dir, attention_backend=backend).eval()
    ids, attention_mask = _batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=attention_mask)
        got = ours(ids, attention_mask=attention_mask)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_dense_pretraining_loss_equals_transformers(bert_dir):
    ref = BertForPreTraining.from_pretrained(bert_dir).eval()
    ours = SparseBertForPreTraining.from_pretrained(bert_dir).eval()
    ids, attention_mask = _batch()
    labels = torch.where(attention_mask.bool(), ids, -100)
    nsp = torch.tensor([0, 1, 0])
    expected = ref(ids, attention_mask=attention_mask, labels=labels, next_sentence_label=nsp)
    got = ours(ids, attention_mask=attention_mask, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(got.loss, expected.loss)
    torch.testing.assert_close(got.mlm_loss + got.nsp_loss, expected.loss)
    assert got.mask_penalty is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "pattern", ["star", {"name": "longformer", "window": 2, "no_diagonal": True}, "bigbird"]
)
def test_masked_key_cannot_change_query_output(backend, pattern):
    torch.manual_seed(0)
    config = SparseBertConfig(
        **{**TINY, "num_hidden_layers": 1}, attention_pattern=pattern, attention_backend=backend
    )
    model = SparseBertModel(config, add_pooling_layer=False).eval()
    seq_len = 24
    mask = build_mask(pattern, seq_len, config.num_attention_heads)
    ids, _ = _batch(1, seq_len)
    query = 12
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    for key in range(seq_len):
        changed = ids.clone()
        changed[0, key] = (ids[0, key] + 7) % TINY["vocab_size"]
        with torch.no_grad():
            moved = not torch.allclose(
                model(changed).last_hidden_state[0, query], hidden[0, query], atol=1e-6
            )
        # With one layer, token `key` reaches query 12 only through attention.
        assert moved == bool(mask[:, query, key].any()) or key == query


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "pattern",
    ["dense", "star", {"name": "fixed", "block": 8, "no_diagonal": True}, {"name": "dam_s", "frozen": True}],
)
def test_backends_agree_forward_and_backward(pattern):
    ids, attention_mask = _batch(seq_len=30)
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = SparseBertForMaskedLM(
            SparseBertConfig(**TINY, attention_pattern=pattern, attention_backend=backend)
        )
        if backend == "flex":  # no FlexAttention backward on CPU: forward only
            with torch.no_grad():
                results[backend] = (model(ids, attention_mask=attention_mask).logits, None)
            continue
        out = model(ids, attention_mask=attention_mask, labels=ids)
        out.loss.backward()
        results[backend] = (out.logits, _grads(model))
    ref_logits, ref_grads = results["eager"]
    for backend in ("sdpa", "flex", "block_sparse"):
        torch.testing.assert_close(results[backend][0], ref_logits, atol=2e-5, rtol=1e-4)
    for backend in ("sdpa", "block_sparse"):
        for name, grad in results[backend][1].items():
            torch.testing.assert_close(grad, ref_grads[name], atol=2e-5, rtol=1e-4, msg=f"{backend}: {name}")


def test_eager_and_sdpa_agree_while_dam_searches():
    ids, attention_mask = _batch(seq_len=16)
    results = {}
    for backend in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = SparseBertForPreTraining(
            SparseBertConfig(
                **TINY, attention_pattern={"name": "dam_u", "lambda": 1e-3}, attention_backend=backend
            )
        )
        torch.manual_seed(1)  # the same Gumbel noise for both
        out = model(
            ids, attention_mask=attention_mask, labels=ids, next_sentence_label=torch.tensor([0, 1, 1])
        )
        out.loss.backward()
        results[backend] = (out.loss.detach(), model.bert.sparse_mask.alpha.grad.clone())
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0])
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], atol=1e-6, rtol=1e-4)
    assert results["eager"][1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["flex", "block_sparse"])
def test_block_backends_need_a_fixed_mask(backend):
    ids, _ = _batch(1, 8)
    searching = SparseBertForPreTraining(
        SparseBertConfig(**TINY, attention_pattern="dam_s", attention_backend=backend)
    )
    with pytest.raises(ValueError, match=f"attention_backend='{backend}' needs a fixed mask"):
        searching(ids)


def test_flex_has_no_backward_on_cpu():
    ids, _ = _batch(1, 8)
    fixed = SparseBertForMaskedLM(
        SparseBertConfig(**TINY, attention_pattern="star", attention_backend="flex")
    )
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        fixed(ids, labels=ids)


def test_compiled_flex_matches(monkeypatch):
    monkeypatch.setenv("SPARSEBERT_FLEX_COMPILE", "1")
    torch.manual_seed(0)
    model = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern="longformer", attention_backend="flex")
    ).eval()
    ids, attention_mask = _batch(2, 40)
    with torch.no_grad():
        flex = model(ids, attention_mask=attention_mask).last_hidden_state
        model.config.attention_backend = "eager"
        eager = model(ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(flex, eager, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_any_key_are_zero_not_nan(backend):
    """1-token input without diagonal, an all-padding row, and a DAM mask that dropped everything."""
    torch.manual_seed(0)
    no_diag = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern="no_diagonal", attention_backend=backend)
    ).eval()
    with torch.no_grad():
        one = no_diag(torch.tensor([[7]])).last_hidden_state
        padded = no_diag(*_padded_with_empty_row()).last_hidden_state
    assert torch.isfinite(one).all() and torch.isfinite(padded).all()

    dropped = SparseBertForMaskedLM(
        SparseBertConfig(**TINY, attention_pattern={"name": "dam_u", "frozen": True})
    )
    with torch.no_grad():
        dropped.bert.sparse_mask.alpha.fill_(-1.0)  # every position masked
    dropped.config.attention_backend = backend
    assert not dropped.current_mask(6).any()
    ids = torch.randint(5, 60, (2, 6))
    if backend == "flex":
        with torch.no_grad():
            out = dropped(ids, labels=ids)
    else:
        out = dropped(ids, labels=ids)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in dropped.parameters() if p.grad is not None)
    assert torch.isfinite(out.loss)


def _padded_with_empty_row():
    ids = torch.randint(5, 60, (2, 5))
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    return ids, attention_mask


def test_empty_row_rule_is_zero_attention_output():
    """The rule itself: a query with no allowed key gets a zero attention output on every backend."""
    from sparsebert.model.attention import sparse_attention
    from sparsebert.model.layer_masks import LayerMasks

    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    hard = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    hard[0, :, 1] = False  # query 1 may attend nothing
    for backend in BACKENDS:
        module = (
            SparseBertModel(SparseBertConfig(**TINY, attention_backend=backend))
            .encoder.layer[0]
            .attention.self
        )
        out, _ = sparse_attention(module, q, k, v, None, scaling=0.5, sparse_masks=LayerMasks(hard=hard))
        assert torch.equal(out[0, 1], torch.zeros(2, 4)), backend
        assert out[0, [0, 2]].abs().sum() > 0


def test_dam_gradients_and_lambda_drive_alpha_to_sparsity():
    torch.manual_seed(0)
    model = SparseBertForPreTraining(
        SparseBertConfig(**TINY, attention_pattern={"name": "dam_s", "lambda": 0.05, "max_len": 32})
    )
    assert model.searching_mask
    ids, attention_mask = _batch(seq_len=16)
    alpha = model.bert.sparse_mask.alpha
    start = alpha.detach().clone()
    optimizer = torch.optim.AdamW([{"params": [alpha], "weight_decay": 0.0}], lr=0.05)
    for _ in range(5):
        out = model(
            ids, attention_mask=attention_mask, labels=ids, next_sentence_label=torch.tensor([0, 1, 0])
        )
        assert out.mask_penalty is not None and out.mask_penalty > 0
        torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss + out.mask_penalty)
        optimizer.zero_grad()
        out.loss.backward()
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
        optimizer.step()
    used = alpha[..., :16]
    assert (used < start[..., :16]).float().mean() > 0.9  # the λ term pushes α down
    assert model.current_mask(16).float().mean() < 0.5


def test_freeze_gives_binary_deterministic_mask_that_round_trips(tmp_path):
    torch.manual_seed(0)
    config = SparseBertConfig(**TINY, attention_pattern={"name": "dam_u", "share_across_layers": False})
    model = SparseBertForPreTraining(config)
    with torch.no_grad():
        model.bert.sparse_mask.alpha.normal_()
    model.freeze_mask()
    assert not model.searching_mask and not model.bert.sparse_mask.alpha.requires_grad
    assert model.config.attention_pattern["frozen"] is True
    ids, _ = _batch(2, 12)
    out1 = model(ids).prediction_logits
    out2 = model(ids).prediction_logits  # training mode, but no noise once frozen
    torch.testing.assert_close(out1, out2)
    mask = model.current_mask(12)
    assert mask.shape == (2, 2, 12, 12)
    expected = model.bert.sparse_mask.alpha[:, :, :12, :12] > 0
    assert torch.equal(mask, expected)
    assert not torch.equal(mask[0], mask[1])  # per-layer masks when not shared

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = SparseBertForPreTraining.from_pretrained(tmp_path)
    assert loaded.config.attention_pattern == model.config.attention_pattern
    assert torch.equal(loaded.current_mask(12), mask)
    assert not loaded.searching_mask
    clf = SparseBertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert torch.equal(clf.current_mask(12), mask)


def test_dam_s_sampled_masks_are_symmetric_toeplitz():
    torch.manual_seed(0)
    model = SparseBertForPreTraining(SparseBertConfig(**TINY, attention_pattern="dam_s"))
    masks = model.bert.sparse_mask.masks(10)
    hard = masks.hard[0]
    assert torch.equal(hard, hard.transpose(-1, -2))
    for d in range(10):
        diagonal = torch.diagonal(hard, offset=d, dim1=-2, dim2=-1)
        assert (diagonal == diagonal[:, :1]).all()
    torch.testing.assert_close(masks.soft.detach()[0], hard.float())


def test_from_pretrained_any_bert_with_pattern_and_heads(bert_dir):
    model = SparseBertForSequenceClassification.from_pretrained(
        bert_dir,
        num_labels=3,
        attention_pattern={"name": "longformer", "window": 3},
        attention_backend="sdpa",
    )
    assert model.config.attention_pattern["window"] == 3 and model.config.num_labels == 3
    ids, attention_mask = _batch()
    logits = model(ids, attention_mask=attention_mask).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    qa = SparseBertForQuestionAnswering.from_pretrained(bert_dir, attention_pattern="dam_s")
    assert qa.bert.sparse_mask.alpha.abs().max() < 0.01  # missing α initialised near 0 (std 1e-3)
    assert qa(ids, attention_mask=attention_mask).start_logits.shape == (3, 20)


def test_auto_classes_and_config_round_trip(tmp_path):
    config = SparseBertConfig(
        **TINY, attention_pattern={"name": "strided", "stride": 4}, attention_backend="eager"
    )
    SparseBertForPreTraining(config).save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SparseBertModel)
    model = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert isinstance(model, SparseBertForPreTraining)
    assert model.config.attention_pattern == {"name": "strided", "stride": 4, "no_diagonal": False}
    assert model.config.attention_backend == "eager"
    assert torch.equal(model.current_mask(16)[1], build_mask({"name": "strided", "stride": 4}, 16, 2))


def test_fixed_masks_are_cached_across_steps():
    model = SparseBertModel(SparseBertConfig(**TINY, attention_pattern="star"))
    first, second = model.sparse_mask.masks(16), model.sparse_mask.masks(16)
    assert first.hard is second.hard and first.cache is second.cache
    assert first.memo is not second.memo  # per-pass state is not shared


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="unknown attention_backend 'cuda'"):
        SparseBertConfig(**TINY, attention_backend="cuda")
    with pytest.raises(ValueError, match="unknown attention pattern 'starr'"):
        SparseBertConfig(**TINY, attention_pattern="starr")
    model = SparseBertModel(SparseBertConfig(**TINY, attention_pattern={"name": "dam_s", "max_len": 8}))
    with pytest.raises(ValueError, match="sequence length 9 exceeds the DAM mask's max_len 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not learned"):
        SparseBertModel(SparseBertConfig(**TINY)).freeze_mask()
