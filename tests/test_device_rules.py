"""Pre-training's device rules, checked without a GPU: a rank computes and communicates on its accelerator only.

The test gives the rank an accelerator that is not the CPU — the ``meta`` device, whose tensors have shapes but
no data, so every op the model runs is checked for mixing devices — and a dispatch mode that applies NCCL's
rule to collectives: accelerator tensors only (a CPU tensor is an error). Through them runs what a GPU rank of
``pretrain.py`` runs: its reader (prefetch thread included, on the device ``ds_setup.device()`` reports), the
model's forward and backward, the metrics meter and the collectives (metric averaging, the frozen-mask check).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sparsebert.data import model_inputs
from sparsebert.train import distributed as ds_setup
from sparsebert.train.build import build_model
from sparsebert.train.config import load_config
from sparsebert.train.corpus import open_reader
from sparsebert.train.meter import Meter

ACCELERATOR = torch.device("meta")


class NcclRule(TorchDispatchMode):
    """Collectives take accelerator tensors only, as NCCL does. Accelerator (meta) tensors hold no data, so a
    collective runs on CPU stand-ins (in a world of one its result is its input), and ``.item()`` answers 0."""

    def __init__(self):
        super().__init__()
        self.collectives: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(t.device != ACCELERATOR for t in tensors):
                raise RuntimeError(
                    f"{func}: NCCL takes accelerator tensors only, got {[t.device for t in tensors]}"
                )
            self.collectives.append(str(func.overloadpacket))
            stand_ins = pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros_like(t, device="cpu"), args)
            _, work = func(*stand_ins, **kwargs)
            return args[0], work
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == ACCELERATOR:
            return 0
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    from data_prep import prepare_corpus

    root = tmp_path_factory.mktemp("device")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [
        " ".join(
            f"{words[(d + s) % 10].capitalize()} {words[(d * s) % 10]} {words[s % 7]}." for s in range(8)
        )
        for d in range(30)
    ]
    (root / "docs.txt").write_text("\n\n".join(docs))
    prepare_corpus([root / "docs.txt"], root / "prepared", vocab_size=120, seq_len=32, progress=False)
    return root / "prepared"


@pytest.mark.parametrize("pattern", ["{name: dam_s, lambda: 0.01}", "star"])
def test_a_rank_keeps_batches_metrics_and_collectives_on_its_accelerator(
    corpus, process_group, monkeypatch, pattern
):
    monkeypatch.setattr(ds_setup, "device", lambda: ACCELERATOR)  # what DeepSpeed's accelerator reports
    config = load_config(
        "tiny_cpu",
        # sdpa: the backend's choice and block plans read mask data, which meta tensors do not hold
        [f"model.attention_pattern={pattern}", "model.max_position_embeddings=32", "model.mlm_logits=all",
         "model.attention_backend=sdpa",
         "train.micro_batch_size=2", "dam.search_steps=1", "train.max_steps=2"],
    )  # fmt: skip
    reader = open_reader(corpus, config)  # its prefetch thread moves the batches to the device
    tokenizer = reader.tokenizer
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, ds={}).to(ACCELERATOR).train()
    rule = NcclRule()
    with rule:
        meter = Meter()
        batch = next(iter(reader))
        assert batch["input_ids"].device == ACCELERATOR and batch["sample_index"].device.type == "cpu"
        outputs = model(**model_inputs(batch, config.data.nsp))
        outputs.loss.backward()
        meter.add(outputs, batch)
        meter.end_step(applied=True)
        metrics = meter.reduced()
        assert {"loss", "mlm_accuracy", "nsp_accuracy", "tokens"} <= set(metrics)
        assert all(value.device == ACCELERATOR for value in metrics.values())
        assert ds_setup.same_on_all_ranks(model.current_mask(32))
    assert rule.collectives == ["c10d.allreduce_", "c10d.broadcast_", "c10d.allreduce_"]
