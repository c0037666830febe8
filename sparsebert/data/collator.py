"""``MlmCollator``: dynamic BERT masking whose randomness is a pure function of (seed, epoch, sample).

A running RNG would make the masks depend on how many batches came before, so a resumed run would
mask differently from an uninterrupted one. Here every random number is a counter-based hash
(SplitMix64) of ``(seed, stream, epoch, sample_index, position)``: the same sample in the same epoch
is masked the same way on any rank, after any restart, in any batch; a new epoch masks it anew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SELECT, _ACTION, _REPLACEMENT = 1, 2, 3  # independent random streams


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective scramble of uint64 (wrap-around arithmetic is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, stream: int, epoch: np.ndarray, sample_index: np.ndarray, length: int) -> np.ndarray:
    """``[B, length]`` floats in [0, 1), a deterministic function of the arguments alone."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(sample_index), seed, dtype=np.uint64) + np.uint64(stream) * _GOLDEN)
        key = _mix(key ^ epoch.astype(np.uint64))
        key = _mix(key ^ (sample_index.astype(np.uint64) * _GOLDEN))
        x = _mix(key[:, None] + (np.arange(1, length + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class VocabInfo:
    """What masking needs to know about a vocabulary."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    is_continuation: np.ndarray | None = None  # [vocab] bool: token continues a word; None = unknown

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> VocabInfo:
        """From a transformers tokenizer (its backend tells how word pieces are marked)."""
        size = len(tokenizer)
        tokens = [""] * size
        for token, index in tokenizer.get_vocab().items():
            if index < size:
                tokens[index] = token
        continuation = None
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "WordPiece":
            prefix = model.get("continuing_subword_prefix") or "##"
            continuation = np.array([t.startswith(prefix) for t in tokens], dtype=bool)
        else:
            start = _word_start_marker(spec.get("pre_tokenizer"))
            if start is not None:
                continuation = np.array([bool(t) and not t.startswith(start) for t in tokens], dtype=bool)
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token")
        return cls(
            size, int(tokenizer.mask_token_id), tuple(sorted(set(tokenizer.all_special_ids))), continuation
        )


def _word_start_marker(pre_tokenizer: dict | None) -> str | None:
    """The character that marks a word start in SentencePiece (``▁``) or byte-level BPE (``Ġ``) vocabularies."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Metaspace":
        return pre_tokenizer.get("replacement", "▁")
    if pre_tokenizer.get("type") == "ByteLevel":
        return "Ġ"
    for inner in pre_tokenizer.get("pretokenizers", []):
        marker = _word_start_marker(inner)
        if marker:
            return marker
    return None


class MlmCollator:
    """Mask a batch for MLM: ``mlm_probability`` of the non-special tokens are predicted; of those
    80% become ``[MASK]``, 10% a random token, 10% stay (BERT). ``whole_word`` masks all pieces of a
    word together. Every sample with a maskable token gets at least one prediction.

    ``tokenizer_or_vocab_info``: a transformers tokenizer, a tokenizer directory, or a ``VocabInfo``.
    The batch must carry ``sample_index`` and ``epoch`` (``ShardReader`` batches do); the result
    holds the masked ``input_ids`` and ``labels`` (-100 where nothing is predicted) besides the rest.
    """

    def __init__(
        self,
        tokenizer_or_vocab_info: Any,
        *,
        mlm_probability: float = 0.15,
        whole_word: bool = False,
        seed: int = 0,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ) -> None:
        info = tokenizer_or_vocab_info
        if isinstance(info, (str, Path)):
            from transformers import AutoTokenizer

            info = AutoTokenizer.from_pretrained(str(info))
        if not isinstance(info, VocabInfo):
            info = VocabInfo.from_tokenizer(info)
        if whole_word and info.is_continuation is None:
            raise ValueError(
                "whole-word masking needs a WordPiece, SentencePiece or byte-level BPE vocabulary"
            )
        if not 0 < mlm_probability < 1 or mask_token_prob + random_token_prob > 1 or seed < 0:
            raise ValueError(
                "need 0 < mlm_probability < 1, mask_token_prob + random_token_prob <= 1, seed >= 0"
            )
        self.info, self.mlm_probability, self.whole_word, self.seed = info, mlm_probability, whole_word, seed
        self.mask_token_prob, self.random_token_prob = mask_token_prob, random_token_prob
        self._special = np.zeros(info.vocab_size, dtype=bool)
        self._special[list(info.special_ids)] = True
        self._replacements = np.flatnonzero(~self._special)  # random tokens are never special ones

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "sample_index" not in batch or "epoch" not in batch:
            raise ValueError(
                "MlmCollator needs 'sample_index' and 'epoch' in the batch (ShardReader provides them)"
            )
        ids = batch["input_ids"].numpy()
        index, epoch = batch["sample_index"].numpy(), batch["epoch"].numpy()
        B, L = ids.shape
        eligible = ~self._special[ids]
        if "attention_mask" in batch:
            eligible &= batch["attention_mask"].numpy().astype(bool)
        u = uniform(self.seed, _SELECT, epoch, index, L)
        if self.whole_word:
            # A word starts at a non-continuation piece, or at any eligible piece after an ineligible one.
            after_ineligible = np.concatenate([np.ones((B, 1), bool), ~eligible[:, :-1]], axis=1)
            starts = eligible & (~self.info.is_continuation[ids] | after_ineligible)
            start_of = np.maximum.accumulate(np.where(starts, np.arange(L), 0), axis=1)
            u = np.take_along_axis(u, start_of, axis=1)  # every piece follows its word's draw
        chosen = eligible & (u < self.mlm_probability)
        # Guarantee a prediction per sample (an all -100 row adds nothing, an all -100 batch gives NaN).
        empty = ~chosen.any(axis=1) & eligible.any(axis=1)
        if empty.any():
            lowest = np.where(eligible, u, np.inf).argmin(axis=1)
            pick = (u == np.take_along_axis(u, lowest[:, None], axis=1)) & eligible
            chosen |= pick & empty[:, None]
        action = uniform(self.seed, _ACTION, epoch, index, L)
        to_mask = chosen & (action < self.mask_token_prob)
        to_random = (
            chosen
            & (action >= self.mask_token_prob)
            & (action < self.mask_token_prob + self.random_token_prob)
        )
        replacement = self._replacements[
            (uniform(self.seed, _REPLACEMENT, epoch, index, L) * len(self._replacements)).astype(np.int64)
        ]
        masked = np.where(to_mask, self.info.mask_id, np.where(to_random, replacement, ids))
        out = dict(batch)
        out["input_ids"] = torch.from_numpy(masked.astype(np.int64))
        out["labels"] = torch.from_numpy(np.where(chosen, ids, -100).astype(np.int64))
        return out
