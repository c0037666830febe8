"""Longer inputs for a trained BERT: extend its learned position embeddings by copying, as Longformer does.

A BERT checkpoint knows 512 positions. To continue pre-training it at 2048 or 4096 tokens, position ``p`` of the
longer table starts as learned row ``p mod 512``: every 512-token stretch of a long input begins where the model
already is, and continued pre-training then learns what the copies should become. Longformer (Beltagy et al.,
2020) showed that this copying converges much faster than random rows for the new positions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sparsebert.model.masks import LEARNED_PATTERNS


def extend_position_embeddings(model: nn.Module, max_positions: int) -> nn.Module:
    """Give ``model`` (any transformers BERT, SparseBert classes included) ``max_positions`` position embeddings,
    in place, and return it.

    Row ``p`` of the new table is learned row ``p mod P`` of the old one (``P`` = the old
    ``config.max_position_embeddings``, e.g. 512). Updates ``config.max_position_embeddings`` and the
    embeddings' ``position_ids`` / ``token_type_ids`` buffers (transformers' ``BertEmbeddings`` slices them per
    input). A DAM pattern whose ``max_len`` followed the old table size is pinned to it, so that the saved model
    reloads with its learned α; beyond its searched length the mask follows DAM's extension rule anyway.

    Call it on the model before it is wrapped by DeepSpeed: under ZeRO-3 the old table is gathered to be copied,
    and the new one is partitioned when the engine is built. Refuses to shrink the table; the same size is a no-op.
    """
    config = model.config
    old_positions = config.max_position_embeddings
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < old_positions:
        raise ValueError(
            f"max_positions must be an integer >= the model's max_position_embeddings {old_positions}, "
            f"got {max_positions!r}"
        )
    if max_positions == old_positions:
        return model
    embeddings = model.base_model.embeddings
    old = embeddings.position_embeddings.weight
    with _gathered(old):
        rows = old.detach().clone()
    tiled = rows.repeat(-(-max_positions // old_positions), 1)[:max_positions].contiguous()
    # from_pretrained takes the rows as they are: no random init, so the RNG stream is left as it was.
    embeddings.position_embeddings = nn.Embedding.from_pretrained(tiled, freeze=not old.requires_grad)

    position_ids = torch.arange(max_positions, device=rows.device).expand((1, -1))
    embeddings.register_buffer("position_ids", position_ids, persistent=False)
    embeddings.register_buffer(
        "token_type_ids",
        torch.zeros(position_ids.size(), dtype=torch.long, device=rows.device),
        persistent=False,
    )
    _pin_dam_length(config, old_positions)
    config.max_position_embeddings = max_positions
    return model


def _pin_dam_length(config, old_positions: int) -> None:
    """A DAM mask sized by ``max_position_embeddings`` (``max_len`` null) keeps the size of its learned α."""
    pattern = getattr(config, "attention_pattern", None)
    if (
        isinstance(pattern, dict)
        and pattern.get("name") in LEARNED_PATTERNS
        and pattern.get("max_len") is None
    ):
        config.attention_pattern = {**pattern, "max_len": old_positions}


def _gathered(param: torch.Tensor):
    """The full tensor of a ZeRO-3 partitioned parameter for the block (a no-op for a plain one)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])
