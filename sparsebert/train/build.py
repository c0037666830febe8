"""The model and the DeepSpeed engine of a training config (random init or continued from a checkpoint)."""

from __future__ import annotations

import torch

from sparsebert.model.modeling import SparseBertConfig, SparseBertForPreTraining
from sparsebert.model.positions import extend_position_embeddings
from sparsebert.train import distributed as ds_setup
from sparsebert.train import optim
from sparsebert.train.config import MODEL_SIZES, PretrainConfig


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
        model = SparseBertForPreTraining.from_pretrained(
            m.init_from,
            attention_pattern=pattern,
            attention_backend=m.attention_backend,
            mlm_logits=m.mlm_logits,
        )
        if m.max_position_embeddings > model.config.max_position_embeddings:  # e.g. 512 → 4096: copied rows
            extend_position_embeddings(model, m.max_position_embeddings)
    else:
        model_config = SparseBertConfig(
            vocab_size=vocab_size,
            pad_token_id=pad_token_id,
            attention_pattern=pattern,
            attention_backend=m.attention_backend,
            mlm_logits=m.mlm_logits,
            **arch,
        )
        model = SparseBertForPreTraining._from_config(model_config)
    apply_switches(model, config)
    return model


def apply_switches(model: SparseBertForPreTraining, config: PretrainConfig) -> None:
    """``model.gradient_checkpointing`` and ``train.compile``, applied to a built model (before its engine)."""
    if config.model.gradient_checkpointing:
        enable_checkpointing(model)
    if config.train.compile:
        model.compile_layers()


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every encoder layer through transformers' own mechanism.

    Non-reentrant ``torch.utils.checkpoint``: it recomputes a layer from saved inputs through autograd's
    saved-tensor hooks, so gradients reach tensors the layer closes over (a searching DAM mask's soft part
    arrives as a keyword) and ZeRO-3's per-module gather hooks run again in the recompute. DeepSpeed's own
    activation checkpointing (``deepspeed.checkpointing``) acts only where model code calls it, which
    transformers' BERT does not: leave the DeepSpeed JSON's ``activation_checkpointing`` section out.
    """
    kwargs = {"use_reentrant": False}
    # activation_checkpointing_enable is the current name; gradient_checkpointing_enable warns that it is deprecated.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_engine(model, config: PretrainConfig, ds: dict, restarted: bool = False):
    """DeepSpeed engine + schedule. After a weight restart, the schedule spans stage 2 only."""
    optimizer = optim.build_optimizer(model, config.train, guarded=ds_setup.guards_steps(ds), dam=config.dam)
    offset = config.search_steps if restarted else 0
    total = config.train.max_steps - offset

    return ds_setup.initialize(
        model, optimizer, lambda opt: optim.build_scheduler(opt, config.train, total), ds
    )


def freeze_in_place(model, engine, scheduler) -> None:
    """End the DAM search in the running engine: freeze the mask, and α takes no more optimizer steps."""
    model.freeze_mask()
    optim.stop_dam_updates(engine.optimizer, scheduler)
