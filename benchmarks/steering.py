"""Shared by the DAM-steering benchmarks: the demo corpus in any packing and length, a small pre-training loop
(with the sparsity target's controller), held-out MLM loss, and the benchmark header (command, machine, load).

The loop is the trainer's recipe in one process: AdamW over ``sparsebert.train.optim``'s groups (α its own
group at ``dam_lr``), a DAM search steered by ``sparsebert.train.sparsity_target`` for ``search_steps``, the
freeze at the target (α shifted by θ, as the trainer's end of search does), then training with the frozen mask.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import command_line, load_average, machine

from data_prep.format import load_manifest
from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.data import MlmCollator, ShardReader, model_inputs
from sparsebert.train.config import DamConfig, TrainConfig
from sparsebert.train.optim import build_optimizer
from sparsebert.train.sparsity_target import SparsityTarget

RESULTS = Path(__file__).resolve().parent / "results"


def header(device: torch.device) -> str:
    """What every benchmark prints first: its command, the machine and the load it starts under."""
    text = f"Command: `{command_line()}`\nMachine: {machine(device)}\nLoad: {load_average()} (start)"
    print(text, flush=True)
    return text


def demo_corpus(cache: Path, packing: str, seq_len: int) -> Path:
    """The demo's text (Python's documentation) prepared with ``packing`` at ``seq_len``, once per cache."""
    out = cache / f"pydocs-{packing}-{seq_len}"
    if (out / "manifest.json").is_file():
        return out
    from data_prep import prepare_corpus, write_python_docs_corpus

    with tempfile.TemporaryDirectory() as tmp:
        text = write_python_docs_corpus(Path(tmp) / "python_docs.txt")
        prepare_corpus(
            [text], out, train_tokenizer="wordpiece", vocab_size=8192, seq_len=seq_len, packing=packing,
            validation_fraction=0.05, seed=0, shard_size=4096, progress=False, overwrite=True,
        )  # fmt: skip
    return out


def reader(
    corpus: Path, batch: int, split: str = "train", documents: bool = False, seed: int = 0, epochs=None
):
    """A stream of MLM batches of ``corpus``: the training split (endless unless ``epochs``), or one epoch of the
    validation split."""
    kwargs = dict(rank=0, world_size=1, batch_size=batch, documents=documents)
    if split == "validation":
        stream = ShardReader.validation(corpus, epochs=1, **kwargs)
    else:
        stream = ShardReader(corpus, seed=seed, epochs=epochs, **kwargs)
    stream.collator = MlmCollator(corpus / "tokenizer", seed=seed)
    return stream


def model_for(corpus: Path, size: tuple[int, int, int], pattern, seq_len: int) -> SparseBertForPreTraining:
    """A BERT of ``size`` (layers, hidden, heads) for ``corpus``'s vocabulary, without dropout (short runs)."""
    layers, hidden, heads = size
    vocab = load_manifest(corpus)["tokenizer"]["vocab_size"]
    config = SparseBertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max(512, seq_len), attention_pattern=pattern,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return SparseBertForPreTraining(config)


@dataclass
class Trained:
    """What :func:`pretrain` reports: the model, the step times after the search, the search's end state."""

    model: SparseBertForPreTraining
    step_seconds: list[float] = field(default_factory=list)
    expected_sparsity: float | None = None  # 1 − mean σ(α) at the end of the search
    threshold_sparsity: float | None = None  # sparsity of 1[α > 0] before the freeze's shift
    lambdas: list[float] = field(default_factory=list)


def pretrain(
    model,
    batches,
    steps: int,
    search_steps: int = 0,
    target: float | None = None,
    dam: DamConfig | None = None,
    **train_keys,
) -> Trained:
    """``steps`` steps of ``train_keys`` (default AdamW, lr 3e-3, α at 1e-2, clipping at 1.0) with α's recipe
    from ``dam``; the first ``search_steps`` search the DAM mask (steered to ``target`` when given), which is then
    frozen (at the target) unless the search runs to the end (``search_steps >= steps``)."""
    train = TrainConfig(**{"optimizer": "adamw", "lr": 3e-3, "dam_lr": 1e-2, "grad_clip": 1.0, **train_keys})
    optimizer = build_optimizer(model, train, guarded=True, dam=dam or DamConfig())
    control = SparsityTarget.of(DamConfig(target_sparsity=target), search_steps) if target else None
    out, lam, gap = Trained(model), 0.0, 0.0
    model.train()
    for step in range(steps):
        if search_steps and step == search_steps:
            _freeze(model, out, target)
        if control is not None and step < search_steps:
            out.lambdas.append(control.in_force(lam, gap))
            model.steer_mask(out.lambdas[-1], control.goal(step))
        start = time.perf_counter()
        loss = model(**model_inputs(next(batches), nsp=False)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= search_steps:
            out.step_seconds.append(time.perf_counter() - start)
        if control is not None and step < search_steps:
            lam, gap = control.after_step(lam, step, model.expected_mask_density)
    return out


def _freeze(model, out: Trained, target: float | None) -> None:
    seq_len = model.mask_source.search_length
    density = model.expected_mask_density
    out.expected_sparsity = None if density is None else 1 - density
    out.threshold_sparsity = 1 - model.current_mask(seq_len).float().mean().item()
    model.freeze_mask(target_sparsity=target, seq_len=seq_len)


@torch.no_grad()
def heldout_loss(model, corpus: Path, batch: int, documents: bool = False, max_batches: int = 50) -> float:
    """Mean MLM loss over the validation split (up to ``max_batches`` batches), in eval mode."""
    model.eval()
    losses = []
    for i, data in enumerate(reader(corpus, batch, "validation", documents)):
        if i >= max_batches:
            break
        losses.append(model(**model_inputs(data, nsp=False)).loss.item())
    model.train()
    return sum(losses) / len(losses)
