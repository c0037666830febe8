"""``evaluate``: held-out MLM (and NSP) loss and accuracy of a pre-training model, over every rank.

One pass over the validation split (``ShardReader.validation``), in eval mode and without gradients: dropout
is off and a DAM mask is its deterministic mask (α > 0), not a sample, so no random number is drawn and the
training randomness is untouched. The numbers are sums on the device (no host synchronisation per batch),
averaged over ranks by one collective, and read by the host once:

* ``val/mlm_loss``: cross-entropy per masked token, over all masked tokens of the split (a batch's loss is
  weighted by its number of masked tokens, so this is not a mean of batch means);
* ``val/mlm_accuracy``: share of masked tokens whose argmax is the original token;
* ``val/nsp_loss``, ``val/nsp_accuracy`` (``nsp=True``): per sample, over all samples of the split;
* ``val/loss``: ``val/mlm_loss`` (+ ``val/nsp_loss``), the training loss without DAM's λ·‖M‖₁ penalty
  (which is a property of the mask, not of the data, and is absent from an eval-mode pass anyway).

Rows or positions labelled -100 (the validation reader's padding rows) count nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch

from sparsebert.data.reader import model_inputs
from sparsebert.train import distributed as ds_setup
from sparsebert.train.meter import masked_hits

IGNORE_INDEX = -100
# The sums kept on the device, in the order of the one collective.
_SUMS = ("mlm_loss", "mlm_tokens", "mlm_hits", "nsp_loss", "nsp_samples", "nsp_hits")


def evaluate(
    model_or_engine, batches: Iterable[dict[str, torch.Tensor]], *, nsp: bool, max_batches: int | None = None
) -> dict[str, float]:
    """Validation metrics (see the module docstring) of ``model_or_engine`` (a ``SparseBertForPreTraining``
    or the DeepSpeed engine wrapping one) over one pass of ``batches``.

    ``batches``: an iterable whose ``iter()`` is one pass, such as a validation ``ShardReader`` (its batches
    are on the rank's device and carry ``labels``, so give it an ``MlmCollator``). Every rank must call this
    together with the same number of batches (the validation reader guarantees it): each batch is a forward
    pass, which ZeRO-3 runs collectively, and the result is averaged with ``ds_setup.all_mean``.
    ``max_batches`` caps the batches per rank (the first ones of the pass). The model's train/eval mode is
    restored afterwards, also when a batch fails.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    was_training = _module(model_or_engine).training
    model_or_engine.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    passing: Iterator = iter(batches)
    try:
        with torch.no_grad():
            for batch in islice(passing, max_batches):
                outputs = model_or_engine(**model_inputs(batch, nsp))
                for key, value in _batch_sums(outputs, batch, nsp).items():
                    sums[key] = sums[key] + value if key in sums else value
                count += 1
    finally:
        close = getattr(passing, "close", None)
        if close is not None:  # a reader's pass stops its prefetch thread when closed
            close()
        model_or_engine.train(was_training)
    if count == 0:
        raise ValueError("evaluate got no validation batch")
    device = sums["mlm_loss"].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack([sums.get(key, zero) for key in _SUMS])
    # Means over ranks of the per-rank sums: their ratios are the ratios of the sums over all ranks.
    totals = dict(zip(_SUMS, ds_setup.all_mean(stacked).tolist(), strict=True))
    metrics = {
        "val/mlm_loss": _ratio(totals["mlm_loss"], totals["mlm_tokens"]),
        "val/mlm_accuracy": _ratio(totals["mlm_hits"], totals["mlm_tokens"]),
    }
    loss = metrics["val/mlm_loss"]
    if nsp:
        metrics["val/nsp_loss"] = _ratio(totals["nsp_loss"], totals["nsp_samples"])
        metrics["val/nsp_accuracy"] = _ratio(totals["nsp_hits"], totals["nsp_samples"])
        loss += metrics["val/nsp_loss"]
    metrics["val/loss"] = loss
    return metrics


def _module(model_or_engine) -> torch.nn.Module:
    """The model itself (a DeepSpeed engine keeps it as ``module``)."""
    return getattr(model_or_engine, "module", model_or_engine)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _batch_sums(outputs, batch: dict[str, torch.Tensor], nsp: bool) -> dict[str, torch.Tensor]:
    """One batch's sums, float64 on the device (no host synchronisation)."""
    labels = batch["labels"]
    selected = labels != IGNORE_INDEX
    tokens = selected.sum()
    sums = {
        # A batch without a masked token (padding rows only) has a NaN mean loss: it adds 0.
        "mlm_loss": torch.where(tokens > 0, outputs.mlm_loss.double() * tokens, 0.0),
        "mlm_tokens": tokens.double(),
        "mlm_hits": masked_hits(outputs.prediction_logits, labels).double(),
    }
    if nsp:
        nsp_labels = batch["next_sentence_label"]
        counted = nsp_labels != IGNORE_INDEX
        samples = counted.sum()
        nsp_guesses = outputs.seq_relationship_logits.argmax(-1)
        sums |= {
            "nsp_loss": torch.where(samples > 0, outputs.nsp_loss.double() * samples, 0.0),
            "nsp_samples": samples.double(),
            "nsp_hits": ((nsp_guesses == nsp_labels) & counted).sum().double(),
        }
    return sums
