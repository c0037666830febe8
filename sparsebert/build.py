"""The model and the DeepSpeed engine of a training config (random init or continued from a checkpoint)."""

from __future__ import annotations

import torch

from sparsebert import deepspeed_setup as ds_setup
from sparsebert import optim
from sparsebert.modeling import SparseBertConfig, SparseBertForPreTraining
from sparsebert.train_config import MODEL_SIZES, PretrainConfig


def build_model(
    config: PretrainConfig, vocab_size: int, pad_token_id: int, ds: dict, frozen: bool = False
) -> SparseBertForPreTraining:
    """The model of ``config.model`` (random init, or continued from ``model.init_from``)."""
    m = config.model
    pattern = m.mask_spec.to_config()
    if frozen:
        pattern["frozen"] = True
    layers, hidden, heads = MODEL_SIZES[m.size]
    hidden = m.hidden_size or hidden
    arch = dict(
        num_hidden_layers=m.num_layers or layers,
        hidden_size=hidden,
        num_attention_heads=m.num_heads or heads,
        intermediate_size=m.intermediate_size or 4 * hidden,
        max_position_embeddings=m.max_position_embeddings,
        hidden_dropout_prob=m.hidden_dropout,
        attention_probs_dropout_prob=m.attention_dropout,
    )
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank and in every stage
    ds_setup.enable_zero3_init(ds)
    if m.init_from:
        return SparseBertForPreTraining.from_pretrained(
            m.init_from,
            attention_pattern=pattern,
            attention_backend=m.attention_backend,
            mlm_logits=m.mlm_logits,
        )
    model_config = SparseBertConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        attention_pattern=pattern,
        attention_backend=m.attention_backend,
        mlm_logits=m.mlm_logits,
        **arch,
    )
    return SparseBertForPreTraining._from_config(model_config)


def build_engine(model, config: PretrainConfig, ds: dict, restarted: bool = False):
    """DeepSpeed engine + schedule. After a weight restart, the schedule spans stage 2 only."""
    optimizer = optim.build_optimizer(model, config.train, guarded=ds_setup.guards_steps(ds))
    offset = config.search_steps if restarted else 0
    total = config.train.max_steps - offset

    return ds_setup.initialize(
        model, optimizer, lambda opt: optim.build_scheduler(opt, config.train, total), ds
    )


def freeze_in_place(model, engine, scheduler) -> None:
    """End the DAM search in the running engine: freeze the mask, and α takes no more optimizer steps."""
    model.freeze_mask()
    optim.stop_dam_updates(engine.optimizer, scheduler)
