"""Sparse attention for transformers' BERT: one attention function, four backends.

Registered with transformers as the ``"sparsebert"`` attention implementation, together with a matching
mask builder (without one, transformers hands a custom attention function ``attention_mask=None`` and
padding is silently ignored). The model passes the pass's :class:`LayerMasks` down as the
``sparse_masks`` keyword; this module turns it into what each backend needs:

* ``eager`` — scores plus an additive bias; the only path with DAM's paper-exact ``(1 − M)·(−10000)``.
* ``sdpa``  — ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (a float bias
  while DAM searches, so gradients still reach the mask).
* ``flex``  — FlexAttention with a cached ``BlockMask``, so fully masked blocks are skipped
  (:mod:`sparsebert.model.flex_backend`). It applies no attention dropout (FlexAttention cannot), has no backward on
  CPU, and needs a fixed mask.
* ``block_sparse`` — each query block attends only the key blocks it needs, gathered, through SDPA
  (:mod:`sparsebert.model.block_sparse`): forward and backward on any device, no compilation; needs a fixed mask.
* ``auto``  — DAM search or the dense pattern → sdpa; a fixed sparse mask on GPU without attention dropout
  (inference, or a model trained without it) → flex; otherwise (CPU, or GPU training with dropout) a fixed
  sparse mask whose block plan leaves at most ``BLOCK_SPARSE_MAX_WORK`` of dense attention's work (a
  block-structured one, ``dam_b``: ``BLOCK_STRUCTURED_MAX_WORK``) → block_sparse; everything else → sdpa. So no
  backend ``auto`` picks drops the attention dropout.

**Documents.** A pass whose masks carry ``documents`` (``[B, L]`` ids, ``data.document_mask``) attends only within
equal ids, on every backend and while DAM searches: eager, sdpa and registered backends receive the padding
combined with it as one ``[B, 1, L, L]`` mask (built once per pass, like the padding); block_sparse and flex
apply the ids themselves (per gathered block; in the score_mod), without an ``L × L`` mask per sample.

What makes it fast (guarded by ``tests/test_performance_guards.py``): every mask a backend derives is built
once — per mask (cached with it) or, when it depends on the batch's padding, per forward pass (shared by
all layers); a mask that is the same for every head is passed as one ``[L, L]`` mask broadcast over heads
(SDPA runs faster with it); a padding mask with no padding is dropped, so dense SDPA keeps its fastest
kernel; the flex block size is smaller on CPU (more blocks skipped), 128 on GPU; and block_sparse gathers
only the key blocks a query block needs (its plan is built once per mask).

**Rows with no allowed key** (a 1-token input without diagonal, an all-padding row, a DAM row that
dropped everything) output zeros on every backend: the layer's residual connection then carries the
token through unchanged. Never NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sparsebert.choices import ATTENTION_BACKENDS, check
from sparsebert.model.block_sparse import BlockPlan, block_sparse_attention
from sparsebert.model.block_sparse import plan as plan_blocks
from sparsebert.model.flex_backend import attend as flex_attend
from sparsebert.model.layer_masks import LayerMasks

IMPLEMENTATION = "sparsebert"
DAM_NEG = 10000.0  # the paper's additive penalty for a dropped position, (1 − M)·(−10000)
# "auto" uses block_sparse (where it does not use flex) when its plan computes at most this fraction of dense
# attention's scores: above it, gathering and the smaller SDPA problems cost about what masked dense SDPA saves
# (CPU: bigbird at L = 2048, work 0.28: 0.75× the reference in training vs 0.96× for sdpa; longformer at
# L = 512, work 0.15, and a frozen DAM band at L = 1024, work 0.14, gain; benchmarks/results/cpu_attention.md).
# On GPU the same threshold applies until benchmarks/gpu_check.sh has measured one there.
BLOCK_SPARSE_MAX_WORK = 0.2
# A mask that is constant on tiles of its own block size (dam_b) gathers whole tiles of at least 16 (128 by
# default): the gather costs 1/block of the attention it skips, so block_sparse pays far beyond the 0.2 above.
# Until benchmarks/bench_dam_block.py has measured it on a quiet machine, half of dense attention's work.
BLOCK_STRUCTURED_MAX_WORK = 0.5
# Backends that apply a pass's document ids themselves; every other one gets them folded into its padding mask.
_DOCUMENT_AWARE = ("block_sparse", "flex")


def padding_mask(
    batch_size: int, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | None:
    """Mask builder for transformers: the 2D padding mask as a broadcastable bool ``[B, 1, 1, K]``."""
    if attention_mask is None:
        return None
    if not _tracing() and bool(attention_mask.all()):
        return None  # no padding: without a mask dense SDPA keeps its fastest kernel (transformers does the same)
    return attention_mask.to(torch.bool).view(batch_size, 1, 1, -1)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def sparse_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sparse_masks: LayerMasks | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function; inputs are ``[B, H, L, D]``, output ``[B, L, H, D]``."""
    if sparse_masks is None:
        raise RuntimeError(
            "the 'sparsebert' attention needs the model's masks: use the SparseBert* model classes "
            "(they pass `sparse_masks` to every layer)"
        )
    if sparse_masks.seq_len != query.shape[-2] or key.shape[-2] != query.shape[-2]:
        raise ValueError(
            f"mask length {sparse_masks.seq_len} does not match sequence length {query.shape[-2]}"
        )
    slot = sparse_masks.slot(getattr(module, "layer_idx", None))
    needs_grad = torch.is_grad_enabled() and query.requires_grad
    backend = resolved_backend(
        module.config.attention_backend, sparse_masks, query.device, needs_grad, dropout, slot
    )
    padding = attention_mask if backend in _DOCUMENT_AWARE else _keep(sparse_masks, attention_mask)
    out = _BACKENDS[backend](module, query, key, value, sparse_masks, slot, padding, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def resolved_backend(
    requested: str, masks: LayerMasks, device: torch.device, needs_grad: bool, dropout: float, slot: int = 0
) -> str:
    """:func:`choose_backend`, decided once per fixed mask (and device, grad mode, dropout): every layer and
    every later pass of the same mask reuses the decision. A mask that is still searching is new each pass."""
    return masks.derived(
        ("backend", requested, device.type, needs_grad, dropout > 0.0, slot),
        lambda: choose_backend(requested, masks, device, needs_grad, dropout, slot),
    )


def choose_backend(
    requested: str, masks: LayerMasks, device: torch.device, needs_grad: bool, dropout: float, slot: int = 0
) -> str:
    """Resolve ``auto`` and reject combinations a backend cannot run (with the reason).

    ``dropout`` is the attention dropout this pass applies (0 in eval mode). ``auto`` never picks ``flex``
    while it is > 0: FlexAttention cannot apply it, and a sparse run regularised less than a dense one would
    bias every comparison between masks. Such passes go through ``block_sparse`` (which applies dropout)
    where its plan skips enough work, else masked SDPA.
    """
    searching = masks.soft is not None
    if requested == "auto":
        if searching or masks.is_dense:
            return "sdpa"
        if device.type == "cuda" and dropout == 0.0:
            return "flex"
        limit = BLOCK_STRUCTURED_MAX_WORK if masks.block >= 16 else BLOCK_SPARSE_MAX_WORK
        return "block_sparse" if block_plan(masks, slot).work <= limit else "sdpa"
    if requested in ("flex", "block_sparse") and searching:
        raise ValueError(
            f"attention_backend={requested!r} needs a fixed mask; a DAM mask that is still searching trains "
            "through 'eager', 'sdpa' or 'auto' (freeze it with model.freeze_mask() first)"
        )
    if requested == "flex" and needs_grad and device.type != "cuda":
        raise ValueError(
            "attention_backend='flex' has no backward pass on CPU (a PyTorch limitation); "
            "train on CPU with 'block_sparse', 'sdpa', 'eager' or 'auto', and use 'flex' for inference"
        )
    return check("attention_backend", requested, list(_BACKENDS))


def effective_dropout(backend: str, dropout: float) -> float:
    """The attention dropout a pass through ``backend`` really applies (flex applies none)."""
    return 0.0 if backend == "flex" else dropout


# --- masks in each backend's form ----------------------------------------------------------------------


def _keep(masks: LayerMasks, padding: torch.Tensor | None) -> torch.Tensor | None:
    """The batch's key padding ``[B, 1, 1, L]`` combined with its documents (``[B, 1, L, L]``: a query keeps a key
    of its own document only); the padding as it is when the pass has no documents. Built once per pass."""
    documents = masks.documents
    if documents is None:
        return padding

    def build():
        same = documents[:, None, :, None] == documents[:, None, None, :]
        return same if padding is None else same & padding

    return masks.derived(("keep",), build, per_batch=True)


def _allowed(masks: LayerMasks, slot: int, padding: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """(allowed, empty_rows) for a layer: the fixed mask ∧ padding, and the rows with no allowed key.

    ``allowed`` is None when everything is allowed. Derived once per pass (or once per mask when there
    is no padding) and shared by all layers using the same slot.
    """

    def build():
        allowed = None if masks.is_dense else masks.head_shared(slot).unsqueeze(0)  # [1, H|1, L, L]
        if padding is not None:
            allowed = padding if allowed is None else allowed & padding
        empty = None
        if allowed is not None:
            empty = ~allowed.any(dim=-1, keepdim=True)  # [B|1, H|1, L|1, 1]
            if padding is None and not bool(empty.any()):  # fixed mask with no empty row: skip the fix-up
                empty = None
        return allowed, empty

    return masks.derived(("allowed", slot), build, per_batch=padding is not None)


def _zero_empty_rows(out: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    return out if empty is None else out.masked_fill(empty, 0.0)


# --- backends --------------------------------------------------------------------------------------------


# Every backend has this signature: (module, query, key, value [B, H, L, D], masks, slot, padding [B, 1, 1, L]
# bool or None, scaling, dropout) -> [B, H, L, D]; `masks.soft` is set while DAM searches.
BackendFn = Callable[..., torch.Tensor]


def _eager(module, query, key, value, masks, slot, padding, scaling, dropout) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if masks.soft is not None:
        # The paper's DAM bias: dropped positions get −10000, and the straight-through part of M
        # carries the gradient back to α.
        bias, empty = _search_bias(masks, slot, padding, scores.dtype)
        scores = scores + bias
    else:
        allowed, empty = _allowed(masks, slot, padding)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=module.training)
    return _zero_empty_rows(torch.matmul(probs, value), empty)


def _search_masks(masks: LayerMasks, slot: int, padding: torch.Tensor | None):
    """While DAM searches: (positions to mask = padding only, rows with no key under hard ∧ padding)."""

    def build():
        allowed = masks.hard[slot].unsqueeze(0)
        if padding is not None:
            allowed = allowed & padding
        return None if padding is None else ~padding, ~allowed.any(dim=-1, keepdim=True)

    return masks.derived(("search", slot), build, per_batch=True)


def _search_bias(masks: LayerMasks, slot: int, padding: torch.Tensor | None, dtype: torch.dtype):
    """While DAM searches: the additive bias ``(M − 1)·10000`` (−inf-like at padding) and the empty rows.

    Built once per pass and shared by the layers (autograd sums their gradients into it)."""

    def build():
        masked, empty = _search_masks(masks, slot, padding)
        bias = (masks.soft[slot] - 1.0).to(dtype) * DAM_NEG
        if masked is not None:
            bias = bias.masked_fill(masked, torch.finfo(dtype).min)
        return bias, empty

    return masks.derived(("search_bias", slot, dtype), lambda: _kept_for_the_pass(build), per_batch=True)


def _kept_for_the_pass(build: Callable[[], Any]) -> Any:
    """``build()`` with autograd keeping what it saves, even inside a layer under activation checkpointing.

    The first layer of a pass builds what every layer shares (the search bias, which carries α's gradient);
    a checkpointed layer's recompute finds it built and would save fewer tensors than its forward did. The
    identity hooks, innermost, take those tensors away from the checkpoint's own hooks.
    """
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return build()


def _sdpa(module, query, key, value, masks, slot, padding, scaling, dropout) -> torch.Tensor:
    if masks.soft is not None:
        attn_mask, empty = _search_bias(masks, slot, padding, query.dtype)
    else:
        attn_mask, empty = _sdpa_bool_mask(masks, slot, padding)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=scaling
    )
    return _zero_empty_rows(out, empty)


def _sdpa_bool_mask(masks: LayerMasks, slot: int, padding: torch.Tensor | None):

    def build():
        allowed, empty = _allowed(masks, slot, padding)
        # A row with no allowed key would be NaN (0/0) in some SDPA kernels: let it attend everywhere,
        # then zero its output.
        return allowed if empty is None else allowed | empty, empty

    return masks.derived(("sdpa", slot), build, per_batch=padding is not None)


def block_plan(masks: LayerMasks, slot: int) -> BlockPlan:
    """The block-sparse plan of a layer's fixed mask, built once per mask (see :mod:`sparsebert.model.block_sparse`)."""
    return masks.derived(("block_plan", slot), lambda: plan_blocks(masks.head_shared(slot)))


def _block_sparse(module, query, key, value, masks, slot, padding, scaling, dropout) -> torch.Tensor:
    plan = block_plan(masks, slot)
    biases = masks.derived(
        ("block_masks", slot, query.shape[0], query.dtype),
        lambda: plan.masks(query.shape[0], padding, query.dtype, masks.documents),
        per_batch=padding is not None or masks.documents is not None,
    )
    return block_sparse_attention(query, key, value, plan, biases, scaling, dropout)


_BACKENDS: dict[str, BackendFn] = {
    "eager": _eager,
    "sdpa": _sdpa,
    "flex": flex_attend,
    "block_sparse": _block_sparse,
}


def register_backend(name: str, fn: BackendFn) -> BackendFn:
    """Make ``attention_backend=name`` run ``fn`` (the signature of :data:`BackendFn`). ``auto`` never picks a
    registered backend; a model config or training config may name it once it is registered."""
    if name == "auto" or name in _BACKENDS:
        raise ValueError(f"attention backend {name!r} exists already")
    _BACKENDS[name] = fn
    ATTENTION_BACKENDS.append(name)
    return fn


# What transformers calls: the attention function, kept out of torch.compile graphs. It resolves the backend and
# reads the per-mask cache and the per-pass memo (Python dicts that change within a pass), which a compiled graph
# would guard on and recompile for; the backends are fused kernels already (and flex compiles itself).
_uncompiled_attention = torch.compiler.disable(sparse_attention)


def register() -> None:
    """Make ``attn_implementation="sparsebert"`` known to transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, _uncompiled_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, padding_mask)
