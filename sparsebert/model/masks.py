"""The attention-pattern library: every pattern is a pure function returning a boolean mask.

A mask has shape ``[num_heads, seq_len, seq_len]``; ``mask[h, i, j]`` is True when query ``i`` may attend
key ``j`` in head ``h``. Patterns are named by a *spec*: a name (``"longformer"``), a dict overriding the
pattern's defaults (``{"name": "longformer", "window": 4}``), or a dotted path to a user function
(``"mypkg.masks:my_pattern"``). Every pattern accepts ``no_diagonal=True`` to remove ``i == j``.

``dam_u``, ``dam_s`` and ``dam_b`` are *learned* patterns (see :mod:`sparsebert.model.dam`): their specs are
validated here, but their masks come from a model's parameters; the pure tensor helpers that turn those parameters
into masks are in :mod:`sparsebert.model.dam_logits` (and offered here too). This module imports no model code:
everything else in the package builds on it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# DAM's tensor helpers live in their own module; the pattern library offers them too (its public helpers).
from sparsebert.model.dam_logits import alpha_to_mask, distance_matrix, expand_alpha  # noqa: F401

PatternFn = Callable[..., torch.Tensor]

_PATTERNS: dict[str, PatternFn] = {}

# Parameters of the learned (DAM) patterns and their defaults: the paper's (and its reference code's) values.
LEARNED_DEFAULTS: dict[str, Any] = {
    "lambda": 1e-4,  # weight of the L1 penalty λ·‖M‖₁
    "tau": 1.0,  # Gumbel-sigmoid temperature
    "max_len": None,  # longest sequence the mask covers; None = config.max_position_embeddings
    "share_across_layers": True,  # one mask for all layers, as the paper's code
    "init_std": 1e-3,  # α ~ N(0, init_std), so every position starts at p ≈ 0.5
    "frozen": False,  # True once freeze_mask() binarised the mask (α > 0)
}
# dam_b's own: the block size, by default the one the block-skipping kernels skip (flex on GPU, block_sparse), and
# whether all heads share one block layout. block_sparse skips only the blocks no head keeps, so per-head layouts
# (the default, as dam_u/dam_s learn per head) skip little once there are many heads; flex skips per head.
BLOCK_DEFAULTS: dict[str, Any] = {"block": 128, "share_heads": False}
LEARNED_PATTERNS = ("dam_u", "dam_s", "dam_b")

# Parameters every pattern accepts, handled here rather than by each pattern function.
_COMMON_PARAMS = {"no_diagonal": False}


def register_pattern(name: str) -> Callable[[PatternFn], PatternFn]:
    """Register ``fn(seq_len, num_heads, **params) -> bool [L, L] or [H, L, L]`` under ``name``.

    The function's keyword parameters (with their defaults) are the pattern's parameters; a spec naming
    any other parameter is rejected.
    """

    def decorator(fn: PatternFn) -> PatternFn:
        if name in LEARNED_PATTERNS:
            raise ValueError(f"pattern name {name!r} is reserved for the learned DAM masks")
        _PATTERNS[name] = fn
        return fn

    return decorator


def available_patterns() -> list[str]:
    """Names of every registered pattern, learned ones included."""
    return sorted([*_PATTERNS, *LEARNED_PATTERNS])


@dataclass(frozen=True)
class MaskSpec:
    """A validated pattern spec: the name plus *all* its parameters (defaults filled in)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        return self.name in LEARNED_PATTERNS

    def to_config(self) -> str | dict[str, Any]:
        """The JSON-serialisable form stored in a model config."""
        return {"name": self.name, **self.params}


def parse_spec(spec: str | Mapping[str, Any] | MaskSpec) -> MaskSpec:
    """Validate a spec and fill in defaults. Unknown names and parameters raise ``ValueError``."""
    if isinstance(spec, MaskSpec):
        return spec
    if isinstance(spec, str):
        name, overrides = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"attention pattern spec {dict(spec)!r} has no 'name' key")
        overrides = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise ValueError(f"attention pattern spec must be a name or a dict, got {type(spec).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"attention pattern name must be a string, got {name!r}")

    if name in LEARNED_PATTERNS:
        return MaskSpec(name, _check_params(name, learned_defaults(name), overrides))
    fn = _resolve(name)
    defaults = {**_COMMON_PARAMS, **_keyword_defaults(fn)}
    return MaskSpec(name, _check_params(name, defaults, overrides))


def learned_defaults(name: str) -> dict[str, Any]:
    """The parameters of a learned pattern and their defaults."""
    return {**LEARNED_DEFAULTS, **(BLOCK_DEFAULTS if name == "dam_b" else {})}


def build_mask(spec: str | Mapping[str, Any] | MaskSpec, seq_len: int, num_heads: int) -> torch.Tensor:
    """The boolean mask ``[num_heads, seq_len, seq_len]`` of a pattern spec (True = may attend).

    Learned patterns need their logits: pass ``{"name": "dam_s", "alpha": tensor}`` (the mask is α > 0).
    """
    if isinstance(spec, Mapping) and spec.get("name") in LEARNED_PATTERNS:
        return _learned_mask(dict(spec), seq_len, num_heads)
    parsed = parse_spec(spec)
    if parsed.learned:
        raise ValueError(
            f"{parsed.name!r} is a learned pattern: build it inside a model "
            f"(SparseBertConfig(attention_pattern={parsed.name!r})) or pass its logits as 'alpha'"
        )
    _check_size(seq_len, num_heads)
    params = dict(parsed.params)
    no_diagonal = params.pop("no_diagonal")
    mask = _resolve(parsed.name)(seq_len, num_heads, **params)
    mask = _as_head_mask(parsed.name, mask, seq_len, num_heads)
    if no_diagonal:
        mask = mask & ~torch.eye(seq_len, dtype=torch.bool)
    return mask


def code_reference(spec: str | Mapping[str, Any] | MaskSpec) -> str | None:
    """The ``"package.module:function"`` a spec names when resolving it would import that module, else None.

    Imports nothing: callers use it to refuse a pattern that arrives as data (a saved config) before any of
    its code runs. Built-in, registered and learned patterns return None.
    """
    if isinstance(spec, MaskSpec):
        name = spec.name
    elif isinstance(spec, Mapping):
        name = spec.get("name")
    else:
        name = spec
    if not isinstance(name, str) or name in _PATTERNS or name in LEARNED_PATTERNS or ":" not in name:
        return None
    return name


def is_builtin(spec: str | Mapping[str, Any] | MaskSpec) -> bool:
    """Whether a spec names a pattern of this module (built-in or learned), which needs no other code to build:
    what a standalone export can ship (:mod:`sparsebert.model.standalone`)."""
    name = parse_spec(spec).name
    return name in LEARNED_PATTERNS or (name in _PATTERNS and _PATTERNS[name].__module__ == __name__)


def sparsity(mask: torch.Tensor) -> float:
    """Fraction of masked (False) positions."""
    return 1.0 - mask.float().mean().item()


# --- block layouts (a pure function of tensors; DAM's logits are in sparsebert.model.dam_logits) ------------


def padded_blocks(mask: torch.Tensor, block: int) -> torch.Tensor:
    """A bool mask ``[H, L, L]`` padded with False to whole blocks of ``block`` positions, viewed as
    ``[H, n, block, n, block]`` (query block, row in it, key block, column in it): the layout block-sparse
    kernels (FlexAttention's block masks, the ``block_sparse`` gather plan) are built from."""
    heads, seq_len, _ = mask.shape
    n = -(-seq_len // block)
    table = mask.new_zeros(heads, n * block, n * block)
    table[:, :seq_len, :seq_len] = mask
    return table.view(heads, n, block, n, block)


# --- the built-in patterns (the paper's baselines; i = query, j = key, 0-based) ---------------------------


def _distance(seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.arange(seq_len)
    i, j = idx[:, None], idx[None, :]
    return i, j, (i - j).abs()


@register_pattern("dense")
def dense(seq_len: int, num_heads: int) -> torch.Tensor:
    return torch.ones(seq_len, seq_len, dtype=torch.bool)


@register_pattern("no_diagonal")
def no_diagonal(seq_len: int, num_heads: int) -> torch.Tensor:
    return ~torch.eye(seq_len, dtype=torch.bool)


@register_pattern("strided")
def strided(seq_len: int, num_heads: int, stride: int = 16) -> torch.Tensor:
    """Sparse Transformer, strided: |i−j| < ℓ or (i−j) mod ℓ = 0."""
    _positive("stride", stride)
    i, j, d = _distance(seq_len)
    return (d < stride) | ((i - j) % stride == 0)


@register_pattern("fixed")
def fixed(seq_len: int, num_heads: int, block: int = 32, summary: int = 1) -> torch.Tensor:
    """Sparse Transformer, fixed: ⌊i/ℓ⌋ = ⌊j/ℓ⌋ or j mod ℓ ≥ ℓ−c (ℓ = block, c = summary)."""
    _positive("block", block)
    _non_negative("summary", summary)
    i, j, _ = _distance(seq_len)
    return (i // block == j // block) | (j % block >= block - summary)


@register_pattern("longformer")
def longformer(seq_len: int, num_heads: int, window: int = 6, global_tokens: int = 1) -> torch.Tensor:
    """Sliding window plus global tokens: |i−j| ≤ w or i < g or j < g."""
    _non_negative("window", window)
    _non_negative("global_tokens", global_tokens)
    i, j, d = _distance(seq_len)
    return (d <= window) | (i < global_tokens) | (j < global_tokens)


@register_pattern("logsparse")
def logsparse(seq_len: int, num_heads: int) -> torch.Tensor:
    """LogSparse: i = j or |i−j| is a power of two."""
    _, _, d = _distance(seq_len)
    return (d == 0) | ((d & (d - 1)) == 0)


@register_pattern("bigbird")
def bigbird(
    seq_len: int, num_heads: int, window: int = 1, global_tokens: int = 2, random_keys: int = 2, seed: int = 0
) -> torch.Tensor:
    """BigBird: |i−j| ≤ w or i < g or j < g, plus ``random_keys`` seeded random keys per query row."""
    _non_negative("window", window)
    _non_negative("global_tokens", global_tokens)
    _non_negative("random_keys", random_keys)
    _int("seed", seed)
    i, j, d = _distance(seq_len)
    mask = (d <= window) | (i < global_tokens) | (j < global_tokens)
    if random_keys:
        generator = torch.Generator().manual_seed(seed)
        picks = torch.rand(seq_len, seq_len, generator=generator).argsort(dim=-1)[:, :random_keys]
        mask[torch.arange(seq_len)[:, None], picks] = True
    return mask


@register_pattern("star")
def star(seq_len: int, num_heads: int) -> torch.Tensor:
    """Star-Transformer: |i−j| ≤ 1, and token 0 ([CLS]) is the relay every token talks to."""
    i, j, d = _distance(seq_len)
    return (d <= 1) | (i == 0) | (j == 0)


# --- helpers -------------------------------------------------------------------------------------------


def _resolve(name: str) -> PatternFn:
    if name in _PATTERNS:
        return _PATTERNS[name]
    if ":" in name:  # "package.module:function" — lets a config file name a user pattern
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load attention pattern {name!r}: {err}") from err
        if not callable(fn):
            raise ValueError(f"attention pattern {name!r} is not a function")
        return fn
    raise ValueError(
        f"unknown attention pattern {name!r}; known patterns: {', '.join(available_patterns())} "
        "(or 'package.module:function' for a user pattern)"
    )


def _keyword_defaults(fn: PatternFn) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[2:]  # after (seq_len, num_heads)
    return {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}


def _check_params(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r} for attention pattern {name!r}; "
            f"its parameters are: {', '.join(sorted(defaults)) or '(none)'}"
        )
    params = {**defaults, **overrides}
    missing = [k for k, v in params.items() if v is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"attention pattern {name!r} needs parameter {missing[0]!r}")
    if not isinstance(params.get("no_diagonal", False), bool):
        raise ValueError(f"parameter 'no_diagonal' of pattern {name!r} must be true or false")
    if name in LEARNED_PATTERNS:
        _check_learned(params)
    return params


def _check_learned(params: dict[str, Any]) -> None:
    for key in ("lambda", "tau", "init_std"):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"DAM parameter {key!r} must be a number, got {value!r}")
        if value < 0 or (key == "tau" and value == 0):
            raise ValueError(
                f"DAM parameter {key!r} must be {'> 0' if key == 'tau' else '>= 0'}, got {value}"
            )
    if params["max_len"] is not None:
        _positive("max_len", params["max_len"])
    if "block" in params:
        _positive("block", params["block"])
    for key in ("share_across_layers", "frozen", "share_heads"):
        if key in params and not isinstance(params[key], bool):
            raise ValueError(f"DAM parameter {key!r} must be true or false, got {params[key]!r}")


def _learned_mask(spec: dict[str, Any], seq_len: int, num_heads: int) -> torch.Tensor:
    alpha = spec.pop("alpha", None)
    parsed = parse_spec(spec)
    if alpha is None:
        raise ValueError(f"learned pattern {spec['name']!r} needs its logits: pass 'alpha'")
    block = parsed.params.get("block", 0)
    mask = alpha_to_mask(spec["name"], torch.as_tensor(alpha), seq_len, block=block)
    return mask.expand(num_heads, -1, -1).clone()


def _as_head_mask(name: str, mask: Any, seq_len: int, num_heads: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"attention pattern {name!r} must return a bool tensor, got {type(mask).__name__}")
    if mask.shape == (seq_len, seq_len):
        return mask.expand(num_heads, seq_len, seq_len).clone()
    if mask.shape == (num_heads, seq_len, seq_len):
        return mask.clone()
    raise ValueError(
        f"attention pattern {name!r} returned shape {tuple(mask.shape)}; expected "
        f"({seq_len}, {seq_len}) or ({num_heads}, {seq_len}, {seq_len})"
    )


def _check_size(seq_len: int, num_heads: int) -> None:
    _positive("seq_len", seq_len)
    _positive("num_heads", num_heads)


def _int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}")


def _positive(name: str, value: Any) -> None:
    _int(name, value)
    if value < 1:
        raise ValueError(f"parameter {name!r} must be >= 1, got {value}")


def _non_negative(name: str, value: Any) -> None:
    _int(name, value)
    if value < 0:
        raise ValueError(f"parameter {name!r} must be >= 0, got {value}")
