"""Differentiable Attention Mask (DAM): learned attention masks with a Gumbel-sigmoid relaxation.

Every attention position gets a logit α. While searching, each forward pass samples a binary mask

    U ~ Uniform(0, 1),  g = log U − log(1 − U),  p = σ((α + g) / τ)
    M = 1[p > 0.5] + p − stopgrad(p)          (hard forward, soft straight-through backward)

and the loss adds λ·‖M‖₁. ``freeze()`` fixes M = 1[α > 0] for good. ``dam_u`` learns one α per
(head, i, j); ``dam_s`` one per (head, |i − j|), so its masks are symmetric Toeplitz bands; ``dam_b`` one per
(head, query block, key block), so its masks are block-sparse by construction (one sample per block pair).

With a sparsity target (:meth:`DamMask.steer`, driven by the trainer's controller) the loss term is instead
λ·(E[density] − target density), with E[density] the mean of σ(α) (the probability a sampled position is kept)
and λ the controller's Lagrange multiplier.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsebert.model.dam_logits import (
    alpha_to_mask,
    block_index,
    distance_matrix,
    expected_density,
    threshold_for,
)
from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.masks import MaskSpec

# The extension rule beyond the searched length, in words (implemented by sparsebert.model.masks.expand_alpha).
_RULES = {
    "dam_s": "each longer distance takes the logit of the farthest searched distance",
    "dam_u": "each position outside the searched square takes the mean logit of the searched diagonal with "
    "the same offset i - j, offsets clamped to the farthest searched one",
    "dam_b": "each block pair outside the searched blocks takes the mean logit of the searched block diagonal "
    "with the same block offset, offsets clamped to the farthest searched one",
}


class DamMask(nn.Module):
    """The learned mask of ``dam_u`` / ``dam_s`` / ``dam_b``; its output is a :class:`LayerMasks`.

    α has shape ``[n, heads, max_len, max_len]`` (``dam_u``), ``[n, heads, max_len]`` (``dam_s``) or
    ``[n, heads, nb, nb]`` (``dam_b``, ``nb = ⌈max_len / block⌉``), with ``n = 1`` when the mask is shared across
    layers (the paper's default) or ``num_layers`` otherwise.
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
        self.block = int(spec.params.get("block", 0))  # dam_b's block size (0: a token-level mask)
        self.num_heads = num_heads
        heads = 1 if spec.params.get("share_heads", False) else num_heads  # dam_b: one layout for every head
        self.target_density: float | None = None  # set by steer(): the loss holds λ·(E[density] − target)
        self.last_density: torch.Tensor | None = None  # E[density] of the last search pass (detached)
        slots = 1 if spec.params["share_across_layers"] else num_layers
        if self.name == "dam_s":
            shape = (slots, num_heads, max_len)
        elif self.name == "dam_b":
            blocks = -(-max_len // self.block)
            shape = (slots, heads, blocks, blocks)
        else:
            shape = (slots, num_heads, max_len, max_len)
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

    def steer(self, lam: float, target_density: float | None) -> None:
        """Set λ and the target density (None: the paper's λ·‖M‖₁ instead of λ·(E[density] − target))."""
        self.lam = float(lam)
        self.target_density = None if target_density is None else float(target_density)

    def meet_sparsity(self, target_sparsity: float, seq_len: int) -> float:
        """Shift α by the θ for which 1[α > θ] at ``seq_len`` comes closest to ``target_sparsity``, so that the
        mask 1[α > 0] (frozen, exported, extended beyond ``seq_len`` by the same rule) meets it; returns θ."""
        theta = threshold_for(self.name, self.alpha, seq_len, target_sparsity, self.block)
        with torch.no_grad():
            self.alpha.sub_(theta)
        self._frozen_cache.clear()
        return theta

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

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hard, soft) masks ``[n, heads, L, L]``, soft (straight-through) only while searching, and the
        expected density (differentiable) while searching towards a target.

        Returns tensors, not a :class:`LayerMasks`: DeepSpeed ZeRO-3 hooks a module's tensor outputs to
        gather α again for the backward pass. Use :meth:`masks` for the pass's masks.
        """
        if not self.searching:  # frozen, or eval mode mid-search: the deterministic mask 1[α > 0]
            searched = self._logits_length(seq_len)
            hard = alpha_to_mask(self.name, self.alpha.detach(), seq_len, searched, self.block)
            return self._per_head(hard), None, None
        if seq_len > self.max_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds the DAM mask's max_len {self.max_len}; "
                "set the pattern's 'max_len' (or max_position_embeddings) higher"
            )
        # Search passes at a longer length train α there from now on: it joins the searched range.
        self.searched_len.clamp_(min=seq_len)
        logits = self._searched_logits(seq_len)
        # Gumbel-sigmoid: the logistic noise g = log U − log(1 − U) is the difference of two Gumbels.
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        p = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.tau)
        soft = (p > 0.5).to(p.dtype) + p - p.detach()
        if self.name == "dam_s":  # one sample per distance keeps the sampled mask Toeplitz
            soft = soft[..., distance_matrix(seq_len, soft.device)]
        elif self.name == "dam_b":  # one sample per block pair keeps the sampled mask block-sparse
            of = block_index(seq_len, self.block, soft.device)
            soft = soft[..., of[:, None], of[None, :]]
        density = None
        if self.target_density is not None:
            density = expected_density(self.name, self.alpha, seq_len, self.block)
            self.last_density = density.detach()
        soft = self._per_head(soft)
        return soft.detach() > 0.5, soft, density

    def _per_head(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask ``[n, heads, L, L]``: one shared by the heads (``share_heads``) is broadcast to all of them."""
        return mask.expand(-1, self.num_heads, -1, -1)

    def _searched_logits(self, seq_len: int) -> torch.Tensor:
        """The logits a search pass at ``seq_len`` samples (one per position, distance or block pair)."""
        if self.name == "dam_s":
            return self.alpha[..., :seq_len]
        if self.name == "dam_b":
            blocks = -(-seq_len // self.block)
            return self.alpha[..., :blocks, :blocks]
        return self.alpha[..., :seq_len, :seq_len]

    def masks(self, seq_len: int, device: torch.device | None = None) -> LayerMasks:
        """The masks for one forward pass: sampled while searching, cached once frozen."""
        if not self.frozen:
            hard, soft, density = self(seq_len)
            return LayerMasks(hard=hard, soft=soft, penalty=self._penalty(soft, density), block=self.block)
        key = (seq_len, str(device))
        if key not in self._frozen_cache:
            hard, _, _ = self(seq_len)
            self._frozen_cache[key] = LayerMasks(hard=hard, cache={}, block=self.block)
        return self._frozen_cache[key].fresh()

    def _penalty(self, soft: torch.Tensor | None, density: torch.Tensor | None) -> torch.Tensor | None:
        """The pass's loss term: λ·‖M‖₁ (the paper's), or λ·(E[density] − target) under a sparsity target."""
        if soft is None:
            return None
        if density is not None:
            return self.lam * (density - self.target_density)
        return self.lam * soft.sum()
