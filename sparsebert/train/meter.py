"""``Meter``: the training numbers between two logs, kept on the device until the log reads them."""

from __future__ import annotations

import time

import torch

from sparsebert.train import distributed as ds_setup


def masked_hits(prediction_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled (not -100) positions the MLM head's argmax gets right, on the device: no boolean
    indexing, so no host synchronisation. ``prediction_logits`` may hold the masked positions only
    (``mlm_logits="masked_only"``, in the order of ``labels != -100``) or every position."""
    selected = labels != -100
    guesses = prediction_logits.detach().argmax(-1)
    if guesses.dim() == 1:
        guesses = torch.full_like(labels, -1).masked_scatter_(selected, guesses)
    return ((guesses == labels) & selected).sum()


class Meter:
    """Training numbers between two logs, accumulated on the device the model computes them on: the host waits
    for the device once per log, not per micro-batch. Micro-batches of a step DeepSpeed skipped are dropped."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # over the micro-batches of applied steps
        self.pending: dict[str, torch.Tensor] = {}  # the current step's micro-batches
        self.count = self.pending_count = 0
        self.samples = self.pending_samples = 0
        self.start = time.perf_counter()

    def add(self, outputs, batch) -> None:
        """One micro-batch (no host synchronisation)."""
        labels = batch["labels"]
        selected = labels != -100
        hits = masked_hits(outputs.prediction_logits, labels)
        values = {
            "loss": outputs.loss,
            "mlm_loss": outputs.mlm_loss,
            "mlm_accuracy": hits / selected.sum().clamp_min(1),
            "tokens": batch["attention_mask"].sum(),
            "masked_tokens": selected.sum(),
        }
        if outputs.nsp_loss is not None:
            values["nsp_loss"] = outputs.nsp_loss
            nsp_hits = outputs.seq_relationship_logits.detach().argmax(-1) == batch["next_sentence_label"]
            values["nsp_accuracy"] = nsp_hits.float().mean()
        if outputs.mask_penalty is not None:
            values["mask_penalty"] = outputs.mask_penalty
        for key, value in values.items():
            value = value.detach().float()
            self.pending[key] = self.pending[key] + value if key in self.pending else value
        self.pending_count += 1
        self.pending_samples += batch["input_ids"].shape[0]

    def end_step(self, applied: bool) -> None:
        """Keep the step's micro-batches if DeepSpeed applied the step, else drop them."""
        if applied:
            for key, value in self.pending.items():
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.count += self.pending_count
            self.samples += self.pending_samples
        self.pending, self.pending_count, self.pending_samples = {}, 0, 0

    def reduced(self) -> dict[str, torch.Tensor]:
        """Per-micro-batch means, averaged over ranks in one collective; still on the device."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        return dict(zip(keys, ds_setup.all_mean(stacked).unbind(), strict=True))

    def flush(self) -> dict[str, float]:
        """The interval's metrics as numbers (one device → host copy), and a fresh interval."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        reduced = self.reduced()
        values = torch.stack(list(reduced.values())).tolist() if reduced else []
        metrics = dict(zip(reduced, values, strict=True))
        world = ds_setup.world_size()
        for key in ("tokens", "masked_tokens"):  # this rank's mean per micro-batch → all ranks' rate
            metrics[f"{key}_per_s"] = metrics.pop(key, 0.0) * self.count * world / elapsed
        metrics["samples_per_s"] = self.samples * world / elapsed
        self._reset()
        return metrics
