"""Where a model's attention masks come from: a fixed pattern or a learned DAM mask.

Both are ``nn.Module``s whose ``masks(seq_len, device)`` is called once per forward pass and returns a
:class:`LayerMasks`, the masks in force for that pass. The attention backends only ever see that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsebert.model.dam import DamMask
from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.masks import MaskSpec, build_mask


class PatternMask(nn.Module):
    """A fixed pattern from :mod:`sparsebert.model.masks`, built once per (length, device) and cached."""

    def __init__(self, spec: MaskSpec, num_heads: int):
        super().__init__()
        self.spec = spec
        self.num_heads = num_heads
        self.is_dense = spec.name == "dense" and not spec.params["no_diagonal"]
        self.frozen = True  # a pattern is fixed from the start (the same question as for a DAM mask)
        self._cache: dict[tuple, LayerMasks] = {}

    def masks(self, seq_len: int, device: torch.device | None = None) -> LayerMasks:
        """The pattern's masks for one forward pass (built once per length and device)."""
        key = (seq_len, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._cache:
            hard = build_mask(self.spec, seq_len, self.num_heads).to(key[1]).unsqueeze(0)
            self._cache[key] = LayerMasks(hard=hard, cache={}, is_dense=self.is_dense)
        return self._cache[key].fresh()


def build_mask_source(config: Any) -> nn.Module:
    """The mask module a config asks for: :class:`PatternMask` or :class:`~sparsebert.model.dam.DamMask`."""
    spec = config.mask_spec
    if not spec.learned:
        return PatternMask(spec, config.num_attention_heads)
    max_len = spec.params["max_len"] or config.max_position_embeddings
    searched_len = (
        getattr(config, "dam_searched_len", None) or 0
    )  # the saved record; α's own buffer overrides it
    return DamMask(spec, config.num_attention_heads, config.num_hidden_layers, max_len, searched_len)
