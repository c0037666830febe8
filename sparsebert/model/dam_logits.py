"""DAM's logits as tensors: from the learned α to per-position logits, masks, expected density and thresholds.

Pure functions of tensors, shared by the mask module (:mod:`sparsebert.model.dam`), the pattern library
(``build_mask`` with a learned spec and its ``alpha``) and the model (importance). The shapes of α:

* ``dam_u``: ``[..., H, max_len, max_len]``, one logit per (head, i, j);
* ``dam_s``: ``[..., H, max_len]``, one logit per (head, |i − j|);
* ``dam_b``: ``[..., H, nb, nb]``, one logit per (head, query block, key block), ``nb = ⌈max_len / block⌉``.

This module imports nothing of the package: it is the leaf the pattern library builds on.
"""

from __future__ import annotations

import torch


def distance_matrix(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """``|i − j|`` as a long tensor ``[seq_len, seq_len]``."""
    idx = torch.arange(seq_len, device=device)
    return (idx[:, None] - idx[None, :]).abs()


def block_index(seq_len: int, block: int, device: torch.device | None = None) -> torch.Tensor:
    """The block of each position, ``[seq_len]``."""
    return torch.arange(seq_len, device=device) // block


def covered_length(name: str, alpha: torch.Tensor, block: int = 0) -> int:
    """The longest sequence α has logits for."""
    return alpha.shape[-1] * block if name == "dam_b" else alpha.shape[-1]


def expand_alpha(
    name: str, alpha: torch.Tensor, seq_len: int, searched_len: int = 0, block: int = 0
) -> torch.Tensor:
    """Per-position logits ``[..., H, L, L]`` from DAM parameters (``block``: ``dam_b``'s block size).

    ``searched_len`` is the longest length the mask was searched at (0 = unknown: α is used as stored, up to its
    size). Beyond it α was never trained (it holds its random initialisation), so positions there follow the
    extension rule instead, at any length:

    * ``dam_s``: a distance ``d ≥ S`` takes the logit of the farthest searched distance, ``α[S − 1]`` (the
      learned profile is continued flat, so the mask stays a symmetric Toeplitz band);
    * ``dam_u``: a position outside the searched ``S × S`` square takes the mean logit of the searched diagonal
      with the same offset ``i − j``, clamped to the farthest searched offsets ``±(S − 1)`` (a Toeplitz
      continuation of the searched square, as ``dam_s`` but per signed offset); inside the square, α as is;
    * ``dam_b``: ``dam_u``'s rule one level up, on blocks: the searched square is the ``⌈S / block⌉`` blocks a
      search pass touched, and a block pair outside it takes the mean logit of the searched block diagonal with
      the same block offset, clamped; every position takes its block pair's logit, so the mask stays
      block-sparse at any length.
    """
    covered = covered_length(name, alpha, block)
    searched = min(searched_len, covered) if searched_len > 0 else covered
    if seq_len > searched and searched_len <= 0:
        raise ValueError(f"sequence length {seq_len} exceeds the DAM logits' length {covered}")
    if name == "dam_b":
        return _expand_blocks(alpha, seq_len, searched, block)
    if seq_len <= searched:
        if name == "dam_s":
            return alpha[..., :seq_len][..., distance_matrix(seq_len, alpha.device)]
        return alpha[..., :seq_len, :seq_len]
    idx = torch.arange(seq_len, device=alpha.device)
    offset = (idx[:, None] - idx[None, :]).clamp(-(searched - 1), searched - 1)
    if name == "dam_s":
        return alpha[..., :searched][..., offset.abs()]
    square = alpha[..., :searched, :searched]
    return _extend_square(square, offset + searched - 1)


def _expand_blocks(alpha: torch.Tensor, seq_len: int, searched: int, block: int) -> torch.Tensor:
    """``dam_b``'s per-position logits: block logits (extended beyond the searched blocks) read per position."""
    blocks = -(-seq_len // block)
    searched_blocks = -(-searched // block)
    if blocks <= searched_blocks:
        table = alpha[..., :blocks, :blocks]
    else:
        idx = torch.arange(blocks, device=alpha.device)
        offset = (idx[:, None] - idx[None, :]).clamp(-(searched_blocks - 1), searched_blocks - 1)
        table = _extend_square(alpha[..., :searched_blocks, :searched_blocks], offset + searched_blocks - 1)
    of = block_index(seq_len, block, alpha.device)
    return table[..., of[:, None], of[None, :]]


def _extend_square(square: torch.Tensor, offset_index: torch.Tensor) -> torch.Tensor:
    """``dam_u``'s rule: the searched square ``[..., S, S]`` inside, the mean of its diagonal per offset
    (``offset_index`` = clamped ``i − j`` shifted by ``S − 1``, ``[L, L]``) outside."""
    s = square.shape[-1]
    idx = torch.arange(s, device=square.device)
    diagonal_of = (idx[:, None] - idx[None, :] + s - 1).flatten()
    values = square.float().flatten(-2)
    sums = values.new_zeros(*values.shape[:-1], 2 * s - 1).index_add_(-1, diagonal_of, values)
    counts = s - (torch.arange(2 * s - 1, device=square.device) - (s - 1)).abs()
    out = (sums / counts)[..., offset_index].to(square.dtype)
    out[..., :s, :s] = square
    return out


def alpha_to_mask(
    name: str, alpha: torch.Tensor, seq_len: int, searched_len: int = 0, block: int = 0
) -> torch.Tensor:
    """The frozen (binary) mask of DAM logits: M = 1[α > 0], beyond ``searched_len`` by
    :func:`expand_alpha`'s extension rule."""
    return expand_alpha(name, alpha, seq_len, searched_len, block) > 0


def used_logits(
    name: str, alpha: torch.Tensor, seq_len: int, block: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the logits a pass at ``seq_len`` uses ``[..., H, K]``, how many positions of the ``L × L`` map each one
    stands for ``[K]``), without expanding to ``L × L``: what a density or a threshold is computed from."""
    device = alpha.device
    if name == "dam_u":
        return alpha[..., :seq_len, :seq_len].flatten(-2), torch.ones(seq_len * seq_len, device=device)
    if name == "dam_s":
        d = torch.arange(seq_len, device=device)
        return alpha[..., :seq_len], torch.where(d == 0, seq_len, 2 * (seq_len - d)).float()
    blocks = -(-seq_len // block)
    sizes = torch.full((blocks,), float(block), device=device)
    sizes[-1] = seq_len - (blocks - 1) * block
    return alpha[..., :blocks, :blocks].flatten(-2), (sizes[:, None] * sizes[None, :]).flatten()


def expected_density(name: str, alpha: torch.Tensor, seq_len: int, block: int = 0) -> torch.Tensor:
    """The expected density of the masks a search pass at ``seq_len`` samples, differentiable in α.

    A sampled position is kept when ``α + g > 0`` with logistic noise ``g``, which happens with probability
    ``σ(α)`` whatever the temperature; so this is the mean of σ(α) over every (layer, head, i, j).
    """
    logits, weights = used_logits(name, alpha, seq_len, block)
    return (torch.sigmoid(logits.float()) * weights).sum(-1).mean() / (seq_len * seq_len)


def threshold_for(
    name: str, alpha: torch.Tensor, seq_len: int, target_sparsity: float, block: int = 0
) -> float:
    """The θ such that ``1[α > θ]`` at ``seq_len`` comes closest to ``target_sparsity`` (the share of the
    ``L × L`` map dropped, over every layer and head); halfway between two logits, so that no logit sits on it."""
    logits, weights = used_logits(name, alpha.detach().float(), seq_len, block)
    weights = weights.expand_as(logits).flatten()
    values, inverse = torch.unique(logits.flatten(), return_inverse=True)  # sorted ascending
    mass = torch.zeros_like(values).index_add_(0, inverse, weights)
    # kept[k]: the share kept when the k lowest distinct logits are dropped (k = 0 … K)
    kept = torch.cat([mass.flip(0).cumsum(0).flip(0), mass.new_zeros(1)]) / mass.sum()
    k = int((kept - (1.0 - target_sparsity)).abs().argmin())
    if k == 0:
        return float(values[0]) - 1.0
    if k == len(values):
        return float(values[-1]) + 1.0
    return float(values[k - 1] + values[k]) / 2.0
