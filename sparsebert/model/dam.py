"""Differentiable Attention Mask (DAM): learned attention masks with a Gumbel-sigmoid relaxation.

Every attention position gets a logit α. While searching, each forward pass samples a binary mask

    U ~ Uniform(0, 1),  g = log U − log(1 − U),  p = σ((α + g) / τ)
    M = 1[p > 0.5] + p − stopgrad(p)          (hard forward, soft straight-through backward)

and the loss adds λ·‖M‖₁. ``freeze()`` fixes M = 1[α > 0] for good. ``dam_u`` learns one α per
(head, i, j); ``dam_s`` one per (head, |i − j|), so its masks are symmetric Toeplitz bands.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.masks import MaskSpec, alpha_to_mask, distance_matrix

# The extension rule beyond the searched length, in words (implemented by sparsebert.model.masks.expand_alpha).
_RULES = {
    "dam_s": "each longer distance takes the logit of the farthest searched distance",
    "dam_u": "each position outside the searched square takes the mean logit of the searched diagonal with "
    "the same offset i - j, offsets clamped to the farthest searched one",
}


class DamMask(nn.Module):
    """The learned mask of ``dam_u`` / ``dam_s``; its output is a :class:`LayerMasks`.

    α has shape ``[n, heads, max_len, max_len]`` (``dam_u``) or ``[n, heads, max_len]`` (``dam_s``), with
    ``n = 1`` when the mask is shared across layers (the paper's default) or ``num_layers`` otherwise.
    Sizes come from the config, never hard-coded, and α is created without a device so that
    DeepSpeed ZeRO-3 can partition it like any other parameter.
    """

    def __init__(self, spec: MaskSpec, num_heads: int, num_layers: int, max_len: int, searched_len: int = 0):
        super().__init__()
        self.name = spec.name
        self.lam = float(spec.params["lambda"])
        self.tau = float(spec.params["tau"])  # a plain attribute so a trainer can anneal it
        self.init_std = float(spec.params["init_std"])
        self.max_len = max_len
        slots = 1 if spec.params["share_across_layers"] else num_layers
        shape = (slots, num_heads, max_len) if self.name == "dam_s" else (slots, num_heads, max_len, max_len)
        self.alpha = nn.Parameter(torch.empty(shape))
        # The longest length a search pass has sampled (0 = never searched): a buffer, so that it travels with α
        # in every checkpoint (DeepSpeed's and the exported model's). Positions beyond it follow the extension rule.
        self.register_buffer("searched_len", torch.tensor(int(searched_len), dtype=torch.long))
        self.frozen = False
        self._frozen_cache: dict[tuple, LayerMasks] = {}
        self._warned_lengths: set[int] = set()
        self.reset_parameters()
        if spec.params["frozen"]:
            self.freeze()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.normal_(0.0, self.init_std)

    @property
    def searching(self) -> bool:
        """True while the mask is sampled (training mode, not frozen)."""
        return self.training and not self.frozen

    def freeze(self) -> None:
        """Fix the mask at 1[α > 0]: no more noise, no more gradient."""
        self.frozen = True
        self.alpha.requires_grad_(False)
        self._frozen_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._frozen_cache.clear()  # new α, new mask
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def search_length(self) -> int:
        """The longest length the mask was searched at (0 = never searched, or not recorded)."""
        return int(self.searched_len)

    def _logits_length(self, seq_len: int) -> int:
        """The searched length the deterministic mask at ``seq_len`` follows; warns once per longer length."""
        searched = self.search_length
        if searched <= 0:
            if seq_len > self.max_len:
                raise ValueError(
                    f"sequence length {seq_len} exceeds the DAM mask's max_len {self.max_len}; "
                    "set the pattern's 'max_len' (or max_position_embeddings) higher"
                )
            return 0
        if seq_len > searched and seq_len not in self._warned_lengths:
            self._warned_lengths.add(seq_len)
            warnings.warn(
                f"the {self.name} mask was searched at length {searched} and is used at length {seq_len}: "
                f"beyond {searched} it follows the extension rule ({_RULES[self.name]})",
                UserWarning,
                stacklevel=3,
            )
        return searched

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hard, soft) masks ``[n, heads, L, L]``; soft (straight-through) only while searching.

        Returns tensors, not a :class:`LayerMasks`: DeepSpeed ZeRO-3 hooks a module's tensor outputs to
        gather α again for the backward pass. Use :meth:`masks` for the pass's masks.
        """
        if not self.searching:  # frozen, or eval mode mid-search: the deterministic mask 1[α > 0]
            return alpha_to_mask(self.name, self.alpha.detach(), seq_len, self._logits_length(seq_len)), None
        if seq_len > self.max_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds the DAM mask's max_len {self.max_len}; "
                "set the pattern's 'max_len' (or max_position_embeddings) higher"
            )
        # Search passes at a longer length train α there from now on: it joins the searched range.
        self.searched_len.clamp_(min=seq_len)
        logits = self.alpha[..., :seq_len] if self.name == "dam_s" else self.alpha[..., :seq_len, :seq_len]
        # Gumbel-sigmoid: the logistic noise g = log U − log(1 − U) is the difference of two Gumbels.
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        p = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.tau)
        soft = (p > 0.5).to(p.dtype) + p - p.detach()
        if self.name == "dam_s":  # one sample per distance keeps the sampled mask Toeplitz
            soft = soft[..., distance_matrix(seq_len, soft.device)]
        return soft.detach() > 0.5, soft

    def masks(self, seq_len: int, device: torch.device | None = None) -> LayerMasks:
        """The masks for one forward pass: sampled while searching, cached once frozen."""
        if not self.frozen:
            hard, soft = self(seq_len)
            return LayerMasks(hard=hard, soft=soft, penalty_weight=self.lam if soft is not None else 0.0)
        key = (seq_len, str(device))
        if key not in self._frozen_cache:
            hard, _ = self(seq_len)
            self._frozen_cache[key] = LayerMasks(hard=hard, cache={})
        return self._frozen_cache[key].fresh()
