"""Documents kept apart: packed samples record where documents begin, the reader hands the ids over, and no
attention crosses a document on any backend, with any pattern, DAM search included."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from helpers import TINY

from data_prep.format import FORMAT_VERSION, shard_schema
from data_prep.samples import packed_samples, padding_free_samples
from sparsebert import SparseBertConfig, SparseBertForMaskedLM, SparseBertModel

SEQ = 24
# Three documents in the first sample (ids 0, 1, 2), two in the second, with padding after position 20.
DOCS = torch.tensor([[0] * 7 + [1] * 9 + [2] * 8, [0] * 12 + [1] * 12])
PADDING = torch.ones(2, SEQ, dtype=torch.long)
PADDING[1, 20:] = 0


@pytest.fixture(autouse=True)
def _uncompiled_flex(monkeypatch):
    monkeypatch.setenv("SPARSEBERT_FLEX_COMPILE", "0")  # same results, no 30-s compile per shape


def _crossings(
    model, searching: bool = False, documents: torch.Tensor | None = DOCS
) -> list[tuple[int, int, int]]:
    """(sample, query, key) pairs where changing the key token moves the query's output although the two are in
    different documents (or the key is padding). Two layers: a document reached through a third token counts."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, TINY["vocab_size"], (2, SEQ), generator=g)

    def run(tokens):
        if searching:
            torch.manual_seed(1)  # the same Gumbel samples in every pass
            return model(tokens, attention_mask=PADDING, document_ids=documents, labels=tokens).logits
        with torch.no_grad():
            return model(tokens, attention_mask=PADDING, document_ids=documents).last_hidden_state

    base = run(ids)
    found = []
    for key in range(SEQ):
        changed = ids.clone()
        changed[:, key] = (ids[:, key] + 7) % TINY["vocab_size"]
        moved = (run(changed) - base).abs().amax(-1) > 1e-5  # [2, SEQ]
        for b in range(2):
            for query in range(SEQ if b == 0 else 20):
                apart = DOCS[b, query] != DOCS[b, key] or PADDING[b, key] == 0
                if apart and bool(moved[b, query]):
                    found.append((b, query, key))
    return found


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "block_sparse"])
@pytest.mark.parametrize(
    "pattern", ["dense", {"name": "longformer", "window": 3}, {"name": "dam_b", "block": 4}]
)
def test_no_attention_crosses_a_document_on_any_backend(backend, pattern):
    torch.manual_seed(0)
    model = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern=pattern, attention_backend=backend),
        add_pooling_layer=False,
    ).eval()
    if isinstance(pattern, dict) and pattern["name"] == "dam_b":
        with torch.no_grad():
            model.sparse_mask.alpha.normal_()  # a frozen block mask of both signs
        model.freeze_mask()
    assert _crossings(model) == []
    assert _crossings(model, documents=None)  # the probe sees the documents mix without their ids


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["dam_s", "dam_u", "dam_b"])
def test_a_dam_search_keeps_documents_apart(backend, name):
    torch.manual_seed(0)
    pattern = {"name": name, "block": 4} if name == "dam_b" else name
    model = SparseBertForMaskedLM(
        SparseBertConfig(**TINY, attention_pattern=pattern, attention_backend=backend)
    )
    model.train()
    assert model.searching_mask
    assert _crossings(model, searching=True) == []


@pytest.mark.parametrize("backend", ["eager", "sdpa", "block_sparse"])
def test_documents_with_no_diagonal_give_zero_rows_not_nan(backend):
    """A one-token document without the diagonal has no key at all: zero attention output, finite gradients."""
    model = SparseBertForMaskedLM(
        SparseBertConfig(**TINY, attention_pattern="no_diagonal", attention_backend=backend)
    )
    ids = torch.randint(5, 60, (1, 6))
    out = model(ids, document_ids=torch.tensor([[0, 0, 1, 2, 2, 2]]), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_document_ids_must_match_the_batch():
    model = SparseBertModel(SparseBertConfig(**TINY))
    with pytest.raises(ValueError, match=r"document_ids must be \[batch, 8\]"):
        model(torch.ones(2, 8, dtype=torch.long), document_ids=torch.zeros(2, 7, dtype=torch.long))


def _docs(lengths_per_doc):
    token = iter(range(10, 10_000))
    return [[[next(token) for _ in range(n)] for n in doc] for doc in lengths_per_doc]


@pytest.mark.parametrize("pack", [packed_samples, padding_free_samples])
def test_packed_samples_record_where_documents_begin(pack):
    docs = _docs([[3, 4], [5], [2, 2, 2], [6, 1]])
    owner = {t: d for d, doc in enumerate(docs) for s in doc for t in s}
    samples = pack(docs, random.Random(0), seq_len=12, cls_id=1, sep_id=2)
    seen = set()
    for sample in samples:
        assert len(sample.input_ids) <= 12
        bounds = [0, *sample.document_starts, len(sample.input_ids)]
        for start, end in itertools.pairwise(bounds):
            spans = {owner[t] for t in sample.input_ids[start:end] if t in owner}
            assert len(spans) <= 1, (sample, spans)  # one document between two recorded starts
        seen |= {t for t in sample.input_ids if t in owner}
    assert seen == set(owner)  # every token made it into a sample
    if pack is padding_free_samples:  # every sample but one is full
        assert sum(len(s.input_ids) < 12 for s in samples) <= 1


def test_the_format_records_document_starts_from_version_2():
    assert FORMAT_VERSION == 2
    assert "document_starts" in shard_schema(100, "full_sentences").names
    assert "document_starts" in shard_schema(100, "padding_free").names
    assert "document_starts" not in shard_schema(100, "full_sentences", version=1).names
    assert "document_starts" not in shard_schema(100, "nsp").names
