"""``LayerMasks``: the attention masks of one forward pass, as every attention backend receives them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerMasks:
    """The attention masks for one forward pass.

    ``hard`` is ``[n, heads, L, L]`` bool (``n`` = 1 when every layer shares the mask). ``soft`` is the
    straight-through mask ``M`` while DAM searches (forward value equals ``hard``), else None, and ``penalty``
    the pass's DAM loss term then. ``cache`` holds what backends derive from a *fixed* mask (boolean masks,
    block masks) and lives as long as the mask does; ``memo`` holds what they derive for this pass only (masks
    combined with this batch's padding or documents, shared by every layer). ``block`` > 0 says the mask is
    constant on ``block × block`` tiles (``dam_b``): a block-skipping backend loses nothing on it.
    ``documents`` (``[B, L]`` ints, this pass only) keeps attention inside each sample's documents: a query
    attends a key only where their ids are equal (``data.document_mask``).
    """

    hard: torch.Tensor
    soft: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    cache: dict[Any, Any] | None = None
    memo: dict[Any, Any] = field(default_factory=dict)
    is_dense: bool = False
    block: int = 0
    documents: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.hard.shape[-1]

    def slot(self, layer_idx: int | None) -> int:
        """Index into ``hard``/``soft`` for a layer (0 for a mask shared by all layers)."""
        return 0 if self.hard.shape[0] == 1 or layer_idx is None else layer_idx

    def derived(self, key: Any, build: Callable[[], Any], per_batch: bool = False) -> Any:
        """What a backend derives from these masks (``build()``), built once: kept with a fixed mask for as long
        as it lives, or in this pass's memo when it depends on the batch (``per_batch``: padding, batch size)
        or the mask is sampled anew each pass. Every layer of the pass shares it."""
        store = self.memo if per_batch or self.cache is None else self.cache
        if key not in store:
            store[key] = build()
        return store[key]

    def head_shared(self, slot: int) -> torch.Tensor:
        """A layer's fixed mask as ``[1, L, L]`` when every head has the same mask (the built-in patterns), else
        ``[H, L, L]``: a mask broadcast over heads is cheaper for SDPA and FlexAttention alike."""
        hard = self.hard[slot]
        return self.derived(("heads", slot), lambda: hard[:1] if bool((hard == hard[:1]).all()) else hard)

    def fresh(self) -> LayerMasks:
        """The same masks with an empty per-pass memo (the long-lived cache is shared)."""
        return LayerMasks(self.hard, self.soft, self.penalty, self.cache, {}, self.is_dense, self.block)
