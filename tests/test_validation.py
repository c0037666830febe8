"""``sparsebert.train.validation.evaluate`` on a tiny ``SparseBertForPreTraining``, in one process: metrics weighted by
masked tokens and samples, deterministic (DAM's deterministic mask too), the train mode restored, padding rows
ignored, ranks combined by one collective of device tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TINY
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.train import distributed as ds_setup
from sparsebert.train.validation import evaluate

MASK_ID, L = 4, 16
KEYS = {"val/mlm_loss", "val/mlm_accuracy", "val/nsp_loss", "val/nsp_accuracy", "val/loss"}


def _batch(seed: int, rows: int, rate: float, padding_rows: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch: random ids, some right padding, ``rate`` of the real tokens masked for MLM; the last
    ``padding_rows`` rows are a validation reader's padding (labels all -100, NSP label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (rows, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (rows,), generator=g)
    attention = (torch.arange(L) < lengths[:, None]).long()
    chosen = (torch.rand(rows, L, generator=g) < rate) & attention.bool()
    chosen[:, 1] = True  # at least one prediction a row
    labels = torch.where(chosen, ids, -100)
    nsp = torch.randint(0, 2, (rows,), generator=g)
    if padding_rows:
        labels[-padding_rows:] = -100
        nsp[-padding_rows:] = -100
    return {
        "input_ids": torch.where(chosen, MASK_ID, ids),
        "token_type_ids": (torch.arange(L) >= lengths[:, None] // 2).long() * attention,
        "attention_mask": attention,
        "labels": labels,
        "next_sentence_label": nsp,
        "sample_index": torch.arange(rows),
        "epoch": torch.zeros(rows, dtype=torch.long),
    }


# Batches with very different numbers of masked tokens (so a mean of batch means would differ), a last batch
# half padding and one that is only padding (as ranks past the end of the split get).
BATCHES = [
    _batch(0, 4, 0.1),
    _batch(1, 3, 0.6),
    _batch(2, 5, 0.3),
    _batch(3, 4, 0.2, 2),
    _batch(4, 2, 0.2, 2),
]


def _model(pattern="star", **config) -> SparseBertForPreTraining:
    torch.manual_seed(0)
    return SparseBertForPreTraining(SparseBertConfig(**TINY, attention_pattern=pattern, **config))


def _reference(model, batches) -> dict[str, float]:
    """Losses and accuracies over all masked tokens / counted samples of ``batches``, computed directly."""
    model.eval()
    logits, labels, nsp_logits, nsp_labels = [], [], [], []
    with torch.no_grad():
        for b in batches:
            out = model(**{k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
            logits.append(out.prediction_logits.flatten(0, 1))
            labels.append(b["labels"].flatten())
            nsp_logits.append(out.seq_relationship_logits)
            nsp_labels.append(b["next_sentence_label"])
    logits, labels = torch.cat(logits), torch.cat(labels)
    nsp_logits, nsp_labels = torch.cat(nsp_logits), torch.cat(nsp_labels)
    keep, nsp_keep = labels != -100, nsp_labels != -100
    mlm = F.cross_entropy(logits[keep], labels[keep]).item()
    nsp = F.cross_entropy(nsp_logits[nsp_keep], nsp_labels[nsp_keep]).item()
    return {
        "val/mlm_loss": mlm,
        "val/mlm_accuracy": (logits[keep].argmax(-1) == labels[keep]).float().mean().item(),
        "val/nsp_loss": nsp,
        "val/nsp_accuracy": (nsp_logits[nsp_keep].argmax(-1) == nsp_labels[nsp_keep]).float().mean().item(),
        "val/loss": mlm + nsp,
    }


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6) for k in a)


def test_metrics_weight_by_tokens_are_repeatable_and_restore_train_mode():
    model = _model().train()
    first = evaluate(model, BATCHES, nsp=True)
    assert model.training and all(m.training for m in model.modules())  # dropout is back on
    second = evaluate(model, BATCHES, nsp=True)
    assert set(first) == KEYS and all(math.isfinite(v) for v in first.values())
    assert first == second  # the same numbers, exactly
    assert _close(first, _reference(model, BATCHES))
    means = [evaluate(model, [b], nsp=True)["val/mlm_loss"] for b in BATCHES[:-1]]
    assert not math.isclose(
        first["val/mlm_loss"], sum(means) / len(means), rel_tol=1e-4
    )  # not a mean of means


def test_an_eval_mode_model_stays_in_eval_mode_and_nsp_is_optional():
    model = _model().eval()
    metrics = evaluate(model, BATCHES, nsp=False)
    assert not model.training
    assert set(metrics) == {"val/mlm_loss", "val/mlm_accuracy", "val/loss"}
    assert (
        metrics["val/loss"] == metrics["val/mlm_loss"] == evaluate(model, BATCHES, nsp=True)["val/mlm_loss"]
    )


def test_masked_only_logits_give_the_same_numbers():
    full, masked_only = _model(), _model(mlm_logits="masked_only")
    masked_only.load_state_dict(full.state_dict())
    assert _close(evaluate(full, BATCHES, nsp=True), evaluate(masked_only, BATCHES, nsp=True))


def test_a_searching_dam_mask_is_evaluated_with_its_deterministic_mask_without_its_penalty():
    model = _model({"name": "dam_s", "lambda": 0.5}).train()
    assert model.searching_mask
    rng = torch.get_rng_state()
    first, second = evaluate(model, BATCHES, nsp=True), evaluate(model, BATCHES, nsp=True)
    assert first == second and model.searching_mask  # no sampled mask, and the search goes on after
    assert torch.equal(torch.get_rng_state(), rng)  # no random number drawn: training's stream is untouched
    assert _close(first, _reference(model, BATCHES))  # eval mode: the deterministic mask
    assert first["val/loss"] == first["val/mlm_loss"] + first["val/nsp_loss"]  # no λ·‖M‖₁


def test_ranks_are_combined_by_their_sums(monkeypatch):
    """Two ranks with shares of different sizes give what one rank with all the batches gives."""
    model = _model()
    whole = evaluate(model, BATCHES, nsp=True)
    captured = []
    monkeypatch.setattr(ds_setup, "all_mean", lambda t: captured.append(t) or t)
    evaluate(model, BATCHES[:1], nsp=True)  # rank 0: one batch
    monkeypatch.setattr(ds_setup, "all_mean", lambda t: (t + captured[0]) / 2)
    assert _close(evaluate(model, BATCHES[1:], nsp=True), whole)  # rank 1: the other four


def test_max_batches_and_the_end_of_a_pass():
    model = _model()
    closed = []

    class Pass:
        def __iter__(self):
            try:
                yield from BATCHES
            finally:
                closed.append(True)  # a reader's prefetch thread stops when its pass is closed

    assert _close(evaluate(model, Pass(), nsp=True, max_batches=2), evaluate(model, BATCHES[:2], nsp=True))
    assert closed == [True]
    with pytest.raises(ValueError, match="no validation batch"):
        evaluate(model, [], nsp=True)
    with pytest.raises(ValueError, match="max_batches"):
        evaluate(model, BATCHES, nsp=True, max_batches=0)

    def failing():
        yield BATCHES[0]
        raise RuntimeError("shard unreadable")

    model.train()
    with pytest.raises(RuntimeError, match="unreadable"):
        evaluate(model, failing(), nsp=True)
    assert model.training


def test_one_collective_in_a_process_group(process_group, monkeypatch):
    model = _model()
    calls = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda tensor, *a, **k: calls.append(tensor) or all_reduce(tensor, *a, **k)
    )
    metrics = evaluate(model, BATCHES, nsp=True)
    assert len(calls) == 1 and _close(metrics, _reference(model, BATCHES))


ACCELERATOR = torch.device("meta")


class AcceleratorOnly(TorchDispatchMode):
    """A rank's rules without a GPU (as in ``test_device_rules``): the model, the batches and the sums live on
    an accelerator (``meta``: shapes, no data), collectives take accelerator tensors only (NCCL's rule); reads
    by the host answer zeros, and are counted."""

    def __init__(self):
        super().__init__()
        self.collectives: list[str] = []
        self.host_reads = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            assert all(t.device == ACCELERATOR for t in tensors), f"{func} got a host tensor"
            self.collectives.append(str(func.overloadpacket))
            stand_ins = pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros_like(t, device="cpu"), args)
            _, work = func(*stand_ins, **kwargs)
            return args[0], work
        to_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if to_host and args[0].device == ACCELERATOR:
            self.host_reads += 1
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == ACCELERATOR:
            self.syncs += 1  # a host synchronisation (the model makes a few of its own)
            return 0
        return func(*args, **kwargs)


def test_sums_stay_on_the_accelerator_and_meet_in_one_collective(process_group):
    model = _model(attention_backend="sdpa").to(ACCELERATOR).train()  # sdpa: `auto` would read mask data
    batches = [{k: v.to(ACCELERATOR) for k, v in b.items()} for b in BATCHES[:2]]
    model_alone, rule = AcceleratorOnly(), AcceleratorOnly()
    for counter in (AcceleratorOnly(), model_alone):  # the first pass builds what the model caches
        with counter, torch.no_grad():
            for b in batches:
                model.eval()(**{k: v for k, v in b.items() if k not in ("sample_index", "epoch")})
    model.train()
    with rule:
        evaluate(model, batches, nsp=True)
    assert rule.collectives == ["c10d.allreduce_"] and rule.host_reads == 1  # one read, after the pass
    assert rule.syncs == model_alone.syncs  # evaluate adds no synchronisation of its own
