"""The ``flex`` attention backend: FlexAttention with a cached ``BlockMask``, so fully masked blocks are skipped.

It needs ``torch.compile`` to beat SDPA, applies no attention dropout (FlexAttention cannot; ``auto`` therefore
trains through another backend while dropout is due, see :func:`sparsebert.model.attention.choose_backend`), has no
backward pass on CPU, and needs a fixed mask.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.masks import padded_blocks

# The granularity at which FlexAttention skips work. GPU: FlexAttention's default (its Triton tiles). CPU: the
# C++ kernel tiles by the block size itself, and small blocks skip most of a banded mask: 16 beat 32, 64 and
# 128 at L = 512…4096 (longformer, L=4096: ≈ 9× dense SDPA vs ≈ 2× with 128; benchmarks/results/).
FLEX_BLOCK = 128
CPU_FLEX_BLOCK = 16


def attend(module, query, key, value, masks, slot, padding, scaling, dropout) -> torch.Tensor:
    if dropout > 0.0:
        _warn_once(
            "flex_dropout",
            f"attention_backend='flex' applies no attention dropout (the model asks for {dropout}); "
            "'auto' would train this mask through block_sparse or sdpa, which apply it",
        )
    # Sequences are padded to whole blocks (padded keys are masked, padded queries dropped): compiled
    # FlexAttention on CPU (torch 2.13) computes wrong rows when the length is not a multiple of the block.
    block = flex_block_size(query.device)
    seq_len = masks.seq_len
    padded_len = -(-seq_len // block) * block
    if padded_len != seq_len:
        query, key, value = (F.pad(t, (0, 0, 0, padded_len - seq_len)) for t in (query, key, value))
    score_mod = None
    if masks.documents is not None:
        # Documents, like padding, go into the score_mod (padded positions get id −1, which no token has).
        docs = F.pad(masks.documents, (0, padded_len - seq_len), value=-1)
        if padding is not None:
            docs = docs.masked_fill(
                F.pad(~padding.view(query.shape[0], seq_len), (0, padded_len - seq_len)), -2
            )

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(
                (docs[b, kv_idx] == docs[b, q_idx]) & (docs[b, kv_idx] >= 0), score, -float("inf")
            )
    elif padding is not None:
        # Padding goes into a score_mod rather than the block mask: the block mask stays cached (built
        # once per mask, not per batch) and its full blocks stay full. Rows left with no key give zeros.
        keep = padding.new_zeros(query.shape[0], padded_len)
        keep[:, :seq_len] = padding.view(query.shape[0], seq_len)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(keep[b, kv_idx], score, -float("inf"))
    elif padded_len != seq_len:
        # The block mask already masks the padded keys, but compiled FlexAttention on CPU (torch 2.13) without
        # a score_mod still miscomputes the last block's rows at some padded lengths (block 16: L = 20, 70,
        # 100, 130); with one it has matched eager at every length tried.

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx < seq_len, score, -float("inf"))

    block_mask = block_mask_of(masks, slot, block)
    flex = flex_function(query.is_cuda)
    out = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return out[:, :, :seq_len]


def flex_block_size(device: torch.device) -> int:
    """The FlexAttention block size used on ``device`` (see ``CPU_FLEX_BLOCK``)."""
    return CPU_FLEX_BLOCK if device.type == "cpu" else FLEX_BLOCK


def block_density(masks: LayerMasks, slot: int, block: int) -> float:
    """Fraction of ``block × block`` tiles of a layer's fixed mask that hold any allowed position: the share of
    dense attention's work a block-sparse kernel still does (its ideal speed-up is the inverse)."""

    def build():
        _, partial, full = _block_structure(masks.head_shared(slot), block)
        return float((partial | full).float().mean())

    return masks.derived(("block_density", slot, block), build)


def block_mask_of(masks: LayerMasks, slot: int, block: int):
    """The ``BlockMask`` of a layer's fixed mask, cached with it: fully masked blocks are skipped.

    Built from block-level any/all of the mask (no per-pair mask-function sweep). A mask shared by all heads
    gives a one-head block mask that FlexAttention broadcasts.
    """
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        hard = masks.head_shared(slot)
        table, partial, full = _block_structure(hard, block)
        if hard.shape[0] == 1:
            plane = table[0]

            def mask_mod(b, h, q_idx, kv_idx):
                return plane[q_idx, kv_idx]
        else:

            def mask_mod(b, h, q_idx, kv_idx):
                return table[h, q_idx, kv_idx]

        return BlockMask.from_kv_blocks(
            *_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
            seq_lengths=table.shape[1:],
        )  # fmt: skip

    return masks.derived(("flex", slot, block), build)


def _block_structure(hard: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table, partial, full) of a bool mask ``[H, L, L]``.

    ``table`` is the mask padded with False to whole blocks (the length attention runs at). ``partial``/``full`` are
    the block flags ``[1, H, nQ, nK]``.
    """
    blocks = padded_blocks(hard, block)
    valid = padded_blocks(torch.ones_like(hard[:1]), block)  # the real positions, not the block padding
    heads, n = blocks.shape[:2]
    any_ = blocks.any(dim=4).any(dim=2)
    all_ = (blocks | ~valid).all(dim=4).all(dim=2)
    return blocks.reshape(heads, n * block, n * block), (any_ & ~all_).unsqueeze(0), all_.unsqueeze(0)


def _ordered(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block flags → (number of kv blocks per query block, their indices first), as BlockMask wants."""
    counts = flags.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts, indices


_FLEX: dict[bool, object] = {}


def flex_function(cuda: bool):
    """FlexAttention, compiled (it needs ``torch.compile`` to beat SDPA) unless disabled.

    ``SPARSEBERT_FLEX_COMPILE=0`` runs it uncompiled — the same results, slowly (useful for debugging).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if os.environ.get("SPARSEBERT_FLEX_COMPILE", "1") == "0":
        return flex_attention
    if cuda not in _FLEX:
        _FLEX[cuda] = torch.compile(flex_attention, dynamic=False)
    return _FLEX[cuda]


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
