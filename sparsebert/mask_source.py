"""Where a model's attention masks come from: a fixed pattern or a learned DAM mask.

Both are ``nn.Module``s whose ``masks(seq_len, device)`` is called once per forward pass and returns a
:class:`LayerMasks`, the masks in force for that pass. The attention backends only ever see that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsebert.masks import MaskSpec, build_mask, parse_spec


@dataclass
class LayerMasks:
    """The attention masks for one forward pass.

    ``hard`` is ``[n, heads, L, L]`` bool (``n`` = 1 when every layer shares the mask). ``soft`` is the
    straight-through mask ``M`` while DAM searches (forward value equals ``hard``), else None.
    ``cache`` holds what backends derive from a *fixed* mask (boolean masks, block masks) and lives as
    long as the mask does; ``memo`` holds what they derive for this pass only (masks combined with this
    batch's padding, shared by every layer).
    """

    hard: torch.Tensor
    soft: torch.Tensor | None = None
    penalty_weight: float = 0.0
    cache: dict[Any, Any] | None = None
    memo: dict[Any, Any] = field(default_factory=dict)
    is_dense: bool = False

    @property
    def seq_len(self) -> int:
        return self.hard.shape[-1]

    def slot(self, layer_idx: int | None) -> int:
        """Index into ``hard``/``soft`` for a layer (0 for a mask shared by all layers)."""
        return 0 if self.hard.shape[0] == 1 or layer_idx is None else layer_idx

    def penalty(self) -> torch.Tensor | None:
        """λ·‖M‖₁ (sum over layers, heads and positions) while searching, else None."""
        if self.soft is None:
            return None
        return self.penalty_weight * self.soft.sum()

    def fresh(self) -> LayerMasks:
        """The same masks with an empty per-pass memo (the long-lived cache is shared)."""
        return LayerMasks(self.hard, self.soft, self.penalty_weight, self.cache, {}, self.is_dense)


class PatternMask(nn.Module):
    """A fixed pattern from :mod:`sparsebert.masks`, built once per (length, device) and cached."""

    def __init__(self, spec: MaskSpec, num_heads: int):
        super().__init__()
        self.spec = spec
        self.num_heads = num_heads
        self.is_dense = spec.name == "dense" and not spec.params["no_diagonal"]
        self._cache: dict[tuple, LayerMasks] = {}

    def masks(self, seq_len: int, device: torch.device | None = None) -> LayerMasks:
        """The pattern's masks for one forward pass (built once per length and device)."""
        key = (seq_len, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._cache:
            hard = build_mask(self.spec, seq_len, self.num_heads).to(key[1]).unsqueeze(0)
            self._cache[key] = LayerMasks(hard=hard, cache={}, is_dense=self.is_dense)
        return self._cache[key].fresh()


def build_mask_source(config: Any) -> nn.Module:
    """The mask module a config asks for: :class:`PatternMask` or :class:`~sparsebert.dam.DamMask`."""
    from sparsebert.dam import DamMask  # dam imports LayerMasks from here

    spec = parse_spec(config.attention_pattern)
    if not spec.learned:
        return PatternMask(spec, config.num_attention_heads)
    max_len = spec.params["max_len"] or config.max_position_embeddings
    return DamMask(spec, config.num_attention_heads, config.num_hidden_layers, max_len)
