"""What makes sparse attention fast, tested as structure (never as timings; see benchmarks/ for those).

Block masks skip fully masked blocks, and block-sparse plans gather only the key blocks a query block needs;
masks and everything derived from them are built once (per mask, or per forward pass when they depend on
padding) and reused; dense SDPA gets no mask; a head-shared mask is broadcast; ``auto`` picks a block backend
only where blocks are skipped; the fast paths still compute what eager does, forward and backward.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import TINY

from sparsebert import (
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForPreTraining,
    SparseBertModel,
)
from sparsebert.model import attention, block_sparse, flex_backend
from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.mask_source import PatternMask
from sparsebert.model.masks import parse_spec

pytestmark = pytest.mark.usefixtures("uncompiled_flex")


def _masks(pattern, seq_len: int, heads: int = 12):
    return PatternMask(parse_spec(pattern), heads).masks(seq_len)


def _visited_blocks(block_mask) -> int:
    return int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())


@pytest.mark.parametrize("block", [flex_backend.CPU_FLEX_BLOCK, flex_backend.FLEX_BLOCK])
def test_block_mask_skips_fully_masked_blocks(block):
    seq_len = 1024
    n = seq_len // block
    longformer = flex_backend.block_mask_of(_masks("longformer", seq_len), 0, block)
    dense = flex_backend.block_mask_of(_masks("dense", seq_len), 0, block)
    assert _visited_blocks(dense) == n * n and int(dense.kv_num_blocks.sum()) == 0  # all full: no mask_mod
    # longformer (window 6, 1 global token): the global row block, the global column and a band of ≤ 3 blocks.
    assert _visited_blocks(longformer) <= n + 4 * (n - 1)  # 36 of 64 blocks at 128, 156 of 1024 at 32
    # Exactly the blocks holding an allowed position are visited.
    hard = _masks("longformer", seq_len).hard[0, 0]
    any_allowed = hard.view(n, block, n, block).any(dim=3).any(dim=1)
    visited = longformer.to_dense()[0, 0].bool()
    assert torch.equal(visited, any_allowed)


def test_block_sparse_plan_gathers_only_the_needed_key_blocks():
    seq_len = 1024
    hard = _masks("longformer", seq_len).hard[0, :1]  # [1, L, L]
    plan = block_sparse.plan(hard)
    n, b = plan.num_blocks, plan.block
    needed = hard.view(n, b, n, b).any(dim=3).any(dim=1)  # [query block, key block]
    # The global token's row needs every key block: that one query block attends the whole sequence.
    assert plan.heavy.tolist() == [0]
    # Every other query block gathers exactly its needed key blocks: the band (≤ 3) and the global column.
    assert plan.kmax <= 4
    for block in range(1, n):
        used = plan.light_mask[block].flatten(0, 1).any(dim=0).view(plan.kmax, b).any(dim=1)  # slots in use
        gathered = set(plan.key_blocks[block][used].tolist())
        assert gathered == set(needed[block].nonzero().flatten().tolist())
    assert plan.work <= (1 + (n - 1) * 4 / n) * b / seq_len + 1e-9  # ≤ 4 key blocks per query block but one
    dense_plan = block_sparse.plan(_masks("dense", 256).hard[0, :1])
    assert dense_plan.work >= 1.0  # nothing to skip


def test_head_shared_patterns_give_one_head_masks_and_dam_keeps_its_heads():
    star = _masks("star", 64)
    assert star.head_shared(0).shape == (1, 64, 64)
    assert flex_backend.block_mask_of(star, 0, 32).kv_num_blocks.shape[1] == 1  # broadcast over heads
    model = SparseBertModel(SparseBertConfig(**TINY, attention_pattern={"name": "dam_s", "frozen": True}))
    with torch.no_grad():
        model.sparse_mask.alpha[0, 0].fill_(1.0)
        model.sparse_mask.alpha[0, 1].fill_(-1.0)
    assert model.sparse_mask.masks(16).head_shared(0).shape == (2, 16, 16)


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _ids(batch=2, seq_len=24, pad_from=None):
    ids = torch.randint(5, TINY["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    if pad_from is not None:
        attention_mask[1:, pad_from:] = 0
    return ids, attention_mask


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "block_sparse"])
def test_masks_are_built_once_and_reused_across_passes(monkeypatch, backend):
    import sparsebert.model.mask_source as mask_source

    builds = _spy(monkeypatch, mask_source, "build_mask")
    derived = _spy(monkeypatch, LayerMasks, "head_shared")  # called when a layer's mask is (re)derived
    blocks = _spy(monkeypatch, flex_backend, "_block_structure")
    plans = _spy(monkeypatch, attention, "plan_blocks")  # the name attention calls block_sparse.plan by
    plan_masks = _spy(monkeypatch, block_sparse.BlockPlan, "masks")
    model = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern="star", attention_backend=backend)
    ).eval()
    ids, full = _ids()
    with torch.no_grad():
        for _ in range(3):
            model(ids, attention_mask=full)
    assert len(builds) == 1  # the pattern, once
    cache = model.sparse_mask.masks(24).cache
    first = dict(cache)
    assert len(derived) == 1  # the mask in the backend's form, once
    assert len(blocks) == (1 if backend == "flex" else 0)
    assert len(plans) == len(plan_masks) == (1 if backend == "block_sparse" else 0)
    with torch.no_grad():
        model(ids, attention_mask=full)
    assert all(cache[key] is value for key, value in first.items())  # same objects, not equal copies

    # With padding: combined with the batch's padding once per pass, shared by both layers.
    derived.clear()
    plan_masks.clear()
    _, padded = _ids(pad_from=10)
    with torch.no_grad():
        model(ids, attention_mask=padded)
        model(ids, attention_mask=padded)
    # flex keeps padding out of its (cached) block mask; block_sparse combines it with its cached plan
    per_pass = 1 if backend in ("eager", "sdpa") else 0
    assert len(derived) == 2 * per_pass  # two passes, two layers: once per pass
    assert len(plans) == (1 if backend == "block_sparse" else 0)
    assert len(plan_masks) == (2 if backend == "block_sparse" else 0)


def test_sdpa_gets_no_mask_when_dense_and_unpadded_and_a_broadcast_mask_when_sparse(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    ids, full = _ids()
    for pattern in ("dense", "star"):
        model = SparseBertModel(SparseBertConfig(**TINY, attention_pattern=pattern, attention_backend="sdpa"))
        with torch.no_grad():
            model(ids, attention_mask=full)
    assert seen[0] is None and seen[1] is None  # dense, all-ones attention mask: the unmasked kernel
    assert seen[2].shape == (1, 1, 24, 24) and seen[2].dtype == torch.bool and seen[2] is seen[3]


def test_auto_uses_block_sparse_on_cpu_only_where_blocks_are_skipped():
    cpu = torch.device("cpu")
    for seq_len in (512, 2048):
        longformer = _masks("longformer", seq_len)
        assert attention.block_plan(longformer, 0).work <= attention.BLOCK_SPARSE_MAX_WORK
        assert attention.choose_backend("auto", longformer, cpu, False, 0.0) == "block_sparse"
        # training too: block_sparse has a backward pass and applies dropout
        assert attention.choose_backend("auto", longformer, cpu, True, 0.1) == "block_sparse"
    # Random keys in every block (bigbird), a short sequence, the dense pattern: masked SDPA.
    assert attention.choose_backend("auto", _masks("bigbird", 1024), cpu, False, 0.0) == "sdpa"
    assert attention.choose_backend("auto", _masks("longformer", 128), cpu, False, 0.0) == "sdpa"
    assert attention.choose_backend("auto", _masks("dense", 1024), cpu, False, 0.0) == "sdpa"
    searching = SparseBertModel(SparseBertConfig(**TINY, attention_pattern="dam_s")).sparse_mask.masks(64)
    assert attention.choose_backend("auto", searching, cpu, True, 0.1) == "sdpa"


def test_auto_never_trades_attention_dropout_for_flex_on_gpu():
    """On GPU, auto picks flex only where no attention dropout is due: flex cannot apply it."""
    cuda = torch.device("cuda", 0)  # the choice needs no GPU, only the device type
    longformer = _masks("longformer", 2048)
    assert attention.choose_backend("auto", longformer, cuda, False, 0.0) == "flex"  # inference
    assert attention.choose_backend("auto", longformer, cuda, True, 0.0) == "flex"  # trained without dropout
    assert attention.choose_backend("auto", longformer, cuda, True, 0.1) == "block_sparse"
    assert attention.choose_backend("auto", _masks("bigbird", 1024), cuda, True, 0.1) == "sdpa"
    assert attention.effective_dropout("flex", 0.1) == 0.0
    assert attention.effective_dropout("block_sparse", 0.1) == 0.1


@pytest.mark.parametrize(
    ("pattern", "training", "expected"),
    [
        ("dense", True, ("sdpa", 0.1)),
        # searching: the soft mask needs every score
        ({"name": "dam_s", "max_len": 512}, True, ("sdpa", 0.1)),
        ({"name": "longformer", "window": 2}, True, ("block_sparse", 0.1)),
        ({"name": "longformer", "window": 2}, False, ("block_sparse", 0.0)),
    ],
)
def test_model_reports_the_attention_a_pass_runs_with(pattern, training, expected):
    config = SparseBertConfig(
        **{**TINY, "max_position_embeddings": 512, "attention_probs_dropout_prob": 0.1},
        attention_pattern=pattern,
    )
    model = SparseBertModel(config)
    state = torch.get_rng_state()
    assert model.attention_in_force(512, training=training) == expected
    assert torch.equal(torch.get_rng_state(), state)  # reporting draws no random numbers


@pytest.mark.parametrize(
    "pattern",
    [{"name": "longformer", "window": 3}, "star", {"name": "dam_s", "frozen": True, "max_len": 64}],
)
def test_flex_matches_eager_on_padded_batches(pattern):
    torch.manual_seed(0)
    model = SparseBertModel(
        SparseBertConfig(**TINY, attention_pattern=pattern, attention_backend="flex")
    ).eval()
    if isinstance(pattern, dict) and pattern["name"] == "dam_s":
        with torch.no_grad():  # per-head masks: the multi-head block-mask path
            model.sparse_mask.alpha.normal_()
    ids, padded = _ids(batch=3, seq_len=40, pad_from=29)  # 40 is no multiple of the block size
    with torch.no_grad():
        flex = model(ids, attention_mask=padded).last_hidden_state
        model.config.attention_backend = "eager"
        eager = model(ids, attention_mask=padded).last_hidden_state
    torch.testing.assert_close(flex, eager, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "pattern",
    [{"name": "longformer", "window": 3}, "star", {"name": "dam_s", "frozen": True, "max_len": 200}],
)
def test_block_sparse_matches_eager_forward_and_backward_on_padded_batches(pattern):
    """Light and heavy query blocks, a length that is no multiple of the block, per-head masks, padding,
    a 1-token sequence (rows with no key): the same outputs and gradients as eager."""
    seq_len = 150
    config = {**TINY, "max_position_embeddings": 256, "attention_probs_dropout_prob": 0.0}
    results = {}
    for backend in ("eager", "block_sparse"):
        torch.manual_seed(0)
        model = SparseBertForMaskedLM(
            SparseBertConfig(**config, attention_pattern=pattern, attention_backend=backend)
        )
        if isinstance(pattern, dict) and pattern["name"] == "dam_s":
            with torch.no_grad():  # a distance band that differs per head
                model.bert.sparse_mask.alpha.fill_(-1.0)
                model.bert.sparse_mask.alpha[0, 0, :5] = 1.0
                model.bert.sparse_mask.alpha[0, 1, :40] = 1.0
        ids, padded = _ids(batch=3, seq_len=seq_len, pad_from=70)
        padded[2, 1:] = 0
        out = model(ids, attention_mask=padded, labels=ids)
        out.loss.backward()
        results[backend] = (
            out.logits,
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        )
    plan = attention.block_plan(model.bert.sparse_mask.masks(seq_len), 0)
    assert len(plan.heavy) < plan.num_blocks
    if pattern != "star" and pattern["name"] == "dam_s":
        assert plan.light_mask.shape[1] == 2  # per-head masks within the gathered blocks
    else:
        assert 0 in plan.heavy.tolist()  # the global token's row attends every key
    torch.testing.assert_close(results["block_sparse"][0], results["eager"][0], atol=2e-5, rtol=1e-4)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["block_sparse"][1][name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_dam_search_bias_is_built_once_per_pass(monkeypatch):
    built = _spy(monkeypatch, attention, "_search_masks")
    model = SparseBertForPreTraining(
        SparseBertConfig(**TINY, attention_pattern="dam_s", attention_backend="sdpa")
    )
    ids, padded = _ids(pad_from=10)
    model(ids, attention_mask=padded, labels=ids).loss.backward()
    assert len(built) == 1  # two layers, one bias
    assert model.bert.sparse_mask.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [SparseBertForPreTraining, SparseBertForMaskedLM])
def test_masked_only_mlm_logits_give_the_same_loss_and_gradients(cls):
    torch.manual_seed(0)
    full = cls(SparseBertConfig(**TINY, attention_pattern="star"))
    masked = cls(SparseBertConfig(**TINY, attention_pattern="star", mlm_logits="masked_only"))
    masked.load_state_dict(full.state_dict())
    ids, padded = _ids(batch=3, pad_from=15)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.2, ids, -100)
    kwargs = {"attention_mask": padded, "labels": labels}
    if cls is SparseBertForPreTraining:
        kwargs["next_sentence_label"] = torch.tensor([0, 1, 0])
    expected, got = full(**{"input_ids": ids, **kwargs}), masked(**{"input_ids": ids, **kwargs})
    torch.testing.assert_close(got.loss, expected.loss)
    expected.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(full.named_parameters(), masked.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    logits = got.prediction_logits if cls is SparseBertForPreTraining else got.logits
    full_logits = expected.prediction_logits if cls is SparseBertForPreTraining else expected.logits
    assert logits.shape == (int((labels != -100).sum()), TINY["vocab_size"])
    torch.testing.assert_close(logits, full_logits[labels != -100])
    without_labels = masked(ids).prediction_logits if cls is SparseBertForPreTraining else masked(ids).logits
    assert without_labels.shape == (3, 24, TINY["vocab_size"])  # no labels: every position, as transformers


def test_mlm_logits_is_validated_and_defaults_to_transformers_semantics(tmp_path):
    assert SparseBertConfig(**TINY).mlm_logits == "all"
    with pytest.raises(ValueError, match="unknown mlm_logits 'masked'"):
        SparseBertConfig(**TINY, mlm_logits="masked")
    SparseBertConfig(**TINY, mlm_logits="masked_only").save_pretrained(tmp_path)
    assert SparseBertConfig.from_pretrained(tmp_path).mlm_logits == "masked_only"


def test_importing_sparsebert_pulls_in_no_cluster_stack():
    """A bare GPU machine (benchmarks/gpu_check.sh) has no deepspeed, ray or mlflow."""
    code = "import sys, sparsebert; print(sorted({'deepspeed', 'ray', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_block_sparse_gathers_in_bounded_chunks_with_the_same_result(monkeypatch):
    """Chunking (bounded temporaries) changes how much is gathered at once, never the result."""
    hard = _masks({"name": "longformer", "window": 3}, 150, 2).hard[0, :1]
    plan = block_sparse.plan(hard)
    q, k, v = (torch.randn(2, 2, 150, 8, requires_grad=True) for _ in range(3))
    padding = torch.ones(2, 1, 1, 150, dtype=torch.bool)
    padding[1, ..., 90:] = False
    masks = plan.masks(2, padding, q.dtype)
    results = []
    for chunk_bytes in (block_sparse.GATHER_CHUNK_BYTES, 1):  # one chunk, then one query block per chunk
        monkeypatch.setattr(block_sparse, "GATHER_CHUNK_BYTES", chunk_bytes)
        gathers = _spy(monkeypatch, torch.Tensor, "index_select")
        out = block_sparse.block_sparse_attention(q, k, v, plan, masks)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
        monkeypatch.undo()
        light_gathers = 2 * (1 if chunk_bytes > 1 else 2 * plan.num_blocks)  # keys and values per chunk
        assert len(gathers) == light_gathers + bool(len(plan.heavy))
    (out, grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, out)
    for a, b in zip(chunked_grads, grads, strict=True):
        torch.testing.assert_close(a, b)
