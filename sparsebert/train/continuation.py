"""Continuing pre-training from a checkpoint (phase 2 at 512, long context, or any HF BERT): where the weights,
the mask and, when asked, the optimizer moments come from, and the checks that they fit the new run.

``model.init_from`` names an HF-format model directory (a run's ``final/`` export, a ``save_pretrained`` BERT
directory, or a hub name such as ``bert-base-uncased``) or a pre-training run's ``output_dir`` (its ``final/`` is
used). The mask (``model.init_mask``):

* ``auto``: a checkpoint with a sparse mask (any pattern but ``dense``) keeps it, a frozen DAM mask frozen and
  identical, as long as ``model.attention_pattern`` is left at ``dense`` or agrees with it (every parameter it
  names has the checkpoint's value); a pattern that contradicts it is an error naming both. A checkpoint without
  one (a plain BERT, a dense run) takes the config's pattern.
* ``checkpoint``: the checkpoint's mask whatever the config says (reported); an error when it has none.
* ``config``: the config's pattern replaces the checkpoint's (reported).

``model.init_optimizer`` also continues the optimizer moments (LAMB/Adam ``exp_avg``, ``exp_avg_sq``) of the run
that exported the checkpoint, as NVIDIA's phase 2 does: DeepSpeed's ``load_checkpoint(load_optimizer_states=True,
load_lr_scheduler_states=False)`` on that run's newest checkpoint, which must hold the exported step. The
learning rate schedule (warm-up included), the step count and the data position start fresh, and the
hyperparameters (lr, betas, eps, weight decay) are this config's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sparsebert.model.masks import parse_spec
from sparsebert.train import checkpoint
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import ConfigError, PretrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
# What fetch takes from the hub: config, weights (safetensors), tokenizer; not other frameworks' weights.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    *TOKENIZER_FILES,
    "special_tokens_map.json",
]
# Optimizer hyperparameters that belong to the new phase: restored after the old moments are loaded.
FRESH_HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


@dataclass(frozen=True)
class Source:
    """The checkpoint a run continues from."""

    init_from: str  # as the config names it
    model_dir: str  # what from_pretrained loads: an HF-format directory or a hub name
    model_config: dict[str, Any]  # its config.json
    run_dir: Path | None  # the pre-training run that exported it (DeepSpeed checkpoints), if any

    @property
    def pattern(self) -> dict[str, Any] | None:
        """The checkpoint's sparse mask spec; None for a plain BERT or a dense one."""
        saved = self.model_config.get("attention_pattern")
        return saved if isinstance(saved, dict) and saved.get("name") != "dense" else None

    @property
    def searched_alpha_in_optimizer(self) -> bool:
        """Its run's optimizer holds DAM's α (a DAM search frozen in place; not after dam.restart_weights)."""
        if self.run_dir is None or self.pattern is None or not parse_spec(self.pattern).learned:
            return False
        tag = checkpoint.latest_tag(self.run_dir)
        return tag is not None and not checkpoint.train_state(self.run_dir, tag).get("restarted", False)


def fetch(init_from: str) -> str:
    """A local directory for ``model.init_from``: the path itself, or a hub model downloaded into this node's
    cache (the user asked for the network by naming one). The trainer calls this on local rank 0 of every node
    before any rank reads the model, so each node downloads it once and no rank reads a half-written cache."""
    if Path(init_from).expanduser().exists():
        return init_from
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(init_from, allow_patterns=HUB_FILES)
        if not any(Path(path).glob("*.safetensors")):  # an older checkpoint: PyTorch weights only
            path = snapshot_download(init_from, allow_patterns=[*HUB_FILES, "pytorch_model*.bin*"])
    except (OSError, ValueError) as err:  # not found, offline, unreachable, not a hub name
        raise ConfigError(
            f"model.init_from={init_from!r} is neither a local directory nor a hub model this node could fetch: "
            f"{err}"
        ) from err
    return path


def locate(init_from: str, local: str | None = None) -> Source:
    """The checkpoint ``model.init_from`` names, with its config; a run's output_dir means its ``final/``.
    ``local``: where :func:`fetch` found or put it (default: ``init_from`` itself)."""
    path = Path(local or init_from).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if checkpoint.latest_tag(path) is None:
            raise ConfigError(
                f"model.init_from={init_from!r} is neither an HF model directory (no config.json) nor a "
                "pre-training run's output_dir (no checkpoints/latest)"
            )
        if not (path / "final" / "config.json").is_file():
            raise ConfigError(
                f"model.init_from={init_from!r} is a pre-training run that has not exported final/ yet: finish it "
                "(run its command again) or name an exported model directory"
            )
        path = path / "final"
    if path.is_dir():
        model_config = json.loads((path / "config.json").read_text())
        run_dir = path.parent if checkpoint.latest_tag(path.parent) else None
        model_dir = str(path)
    else:  # a hub name: the user asked for the network
        from transformers import PretrainedConfig

        model_config, _ = PretrainedConfig.get_config_dict(init_from)
        run_dir, model_dir = None, init_from
    if model_config.get("model_type") not in ("bert", "sparsebert"):
        raise ConfigError(
            f"model.init_from={init_from!r} is a {model_config.get('model_type')!r} model, not a BERT checkpoint"
        )
    return Source(init_from, model_dir, model_config, run_dir)


def resolve_mask(config: PretrainConfig, source: Source) -> tuple[PretrainConfig, str | None]:
    """``config`` with the mask the run continues with (``model.init_mask``), and a line to report when the
    checkpoint's mask is set aside or the config's pattern is."""
    mode, saved, asked = config.model.init_mask, source.pattern, config.model.attention_pattern
    if saved is None:
        if mode == "checkpoint":
            raise ConfigError(
                f"model.init_mask=checkpoint but model.init_from={source.init_from!r} has no sparse mask "
                f"(attention pattern {source.model_config.get('attention_pattern', 'dense')!r}); name one in "
                "model.attention_pattern"
            )
        return config, None
    agrees = _agrees(asked, saved)
    if mode == "config":
        note = None if agrees else (
            f"model.init_mask=config: the checkpoint's mask {_show(saved)} is replaced by {_show(asked)}"
        )  # fmt: skip
        return config, note
    if mode == "auto" and not agrees:
        raise ConfigError(
            f"model.attention_pattern {_show(asked)} contradicts the mask of model.init_from="
            f"{source.init_from!r}, {_show(saved)}: leave model.attention_pattern unset to keep the checkpoint's "
            "mask, or set model.init_mask=config to replace it (model.init_mask=checkpoint ignores the config's)"
        )
    note = None if agrees else f"model.init_mask=checkpoint: keeping {_show(saved)}, not {_show(asked)}"
    return _with_pattern(config, saved), note


def check_fits(source: Source, tokenizer, tokenizer_dir: Path, seq_len: int, config: PretrainConfig) -> None:
    """The checkpoint's vocabulary is the corpus's, and its position embeddings cover the corpus's length, or
    ``model.max_position_embeddings`` covers it: then they are extended by copying."""
    theirs = _tokenizer_of(source)
    ours = tokenizer.get_vocab()
    where = f"the corpus's tokenizer {tokenizer_dir}"
    if theirs is not None and theirs.get_vocab() != ours:
        differing = sorted(set(theirs.get_vocab().items()) ^ set(ours.items()))[:3]
        raise ConfigError(
            f"tokenizer mismatch: model.init_from={source.init_from!r} has a vocabulary of {len(theirs)} tokens, "
            f"{where} one of {len(ours)} (differing: {differing}); prepare the corpus with "
            f"`python -m data_prep ... --tokenizer {source.model_dir}`"
        )
    vocab_size = source.model_config.get("vocab_size")
    if theirs is None and vocab_size != len(ours):
        raise ConfigError(
            f"tokenizer mismatch: model.init_from={source.init_from!r} has vocab_size {vocab_size} (and no "
            f"tokenizer files), {where} has {len(ours)} tokens; prepare the corpus with the checkpoint's tokenizer"
        )
    positions = source.model_config.get("max_position_embeddings", 0)
    wanted = config.model.max_position_embeddings
    if max(positions, wanted) < seq_len:
        raise ConfigError(
            f"model.init_from={source.init_from!r} has {positions} position embeddings, the corpus's samples are "
            f"{seq_len} tokens long; set model.max_position_embeddings={seq_len} to extend them by copying"
        )


def build_config(config: PretrainConfig, source: Source | None, seq_len: int) -> PretrainConfig:
    """The config to build the model from: ``source``'s model directory; its position embeddings as they are
    when they cover ``seq_len``, else extended to ``model.max_position_embeddings``; and, when the moments of a
    DAM mask searched and frozen in place are loaded (its α kept its place in the optimizer, at lr 0), α
    trainable, so the optimizer has the same layout; :func:`sparsebert.train.build.freeze_in_place` freezes it before
    any step."""
    if source is None:
        return config
    positions = source.model_config.get("max_position_embeddings", 0)
    if positions >= seq_len:  # nothing to extend, whatever model.max_position_embeddings says
        config = replace(config, model=replace(config.model, max_position_embeddings=positions))
    config = replace(config, model=replace(config.model, init_from=source.model_dir))  # a run's final/
    spec = config.model.mask_spec
    # model.init_mask=config may have replaced the DAM mask: then there is no α to carry
    if config.model.init_optimizer and source.searched_alpha_in_optimizer and spec.learned:
        return _with_pattern(config, {**spec.to_config(), "frozen": False})
    return config


def load_optimizer(engine, source: Source, config: PretrainConfig) -> str:
    """Load the optimizer moments of ``source``'s run into ``engine`` (and its weights, the exported ones); the
    schedule and hyperparameters stay this config's. Returns the checkpoint's path, for the report."""
    if source.run_dir is None:
        raise ConfigError(
            f"model.init_optimizer=true needs a pre-training run's output (its DeepSpeed checkpoints); "
            f"model.init_from={source.init_from!r} is a model directory without them"
        )
    positions = source.model_config.get("max_position_embeddings", 0)
    extended = engine.module.config.max_position_embeddings
    if extended != positions:
        raise ConfigError(
            f"model.init_optimizer=true cannot continue the optimizer of {source.init_from!r}: its {positions} "
            f"position embeddings were extended to {extended}, which changes their shape; continue with a fresh "
            "optimizer"
        )
    run, tag = source.run_dir, checkpoint.latest_tag(source.run_dir)
    state = checkpoint.train_state(run, tag)
    exported = _exported_step(Path(source.model_dir))
    if exported is not None and exported != state["step"]:
        raise ConfigError(
            f"model.init_optimizer: {source.model_dir} holds step {exported}, but the newest checkpoint of {run} "
            f"is {tag} (step {state['step']}); its moments would not belong to those weights"
        )
    saved = checkpoint.saved_config(run, tag) or {}
    optimizer = saved.get("train", {}).get("optimizer")
    if optimizer is not None and optimizer != config.train.optimizer:
        raise ConfigError(
            f"model.init_optimizer: {run} trained with train.optimizer={optimizer!r}, this run uses "
            f"{config.train.optimizer!r}; the moments of one do not continue the other"
        )
    world = ds_setup.world_size()
    if engine.zero_optimization_stage() > 0 and state.get("world_size") not in (None, world):
        raise ConfigError(
            f"model.init_optimizer: {run} was trained by {state['world_size']} ranks, this run has {world}; ZeRO "
            "partitions the optimizer state by rank: continue on as many ranks, or without model.init_optimizer"
        )
    fresh = [{k: g[k] for k in FRESH_HYPERPARAMETERS if k in g} for g in engine.optimizer.param_groups]
    root = checkpoint.checkpoint_dir(run)
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    for group, values in zip(engine.optimizer.param_groups, fresh, strict=True):
        group.update(values)  # the loaded groups carry the old phase's lr (near 0 at its end) and settings
    return str(root / tag)


# --- internals -------------------------------------------------------------------------------------------


def _agrees(asked: str | dict, saved: dict[str, Any]) -> bool:
    """The config's pattern leaves the checkpoint's mask alone: ``dense`` (the default), or the same name
    with every parameter it names at the checkpoint's value."""
    spec = parse_spec(asked)
    if spec.name == "dense":
        return True
    if spec.name != saved["name"]:
        return False
    named = [k for k in asked if k != "name"] if isinstance(asked, dict) else []
    return all(spec.params[k] == saved.get(k) for k in named)


def _with_pattern(config: PretrainConfig, pattern: dict[str, Any]) -> PretrainConfig:
    return replace(config, model=replace(config.model, attention_pattern=pattern))


def _show(pattern: str | dict) -> str:
    return json.dumps(pattern, sort_keys=True) if isinstance(pattern, dict) else repr(pattern)


def _tokenizer_of(source: Source):
    """The checkpoint's tokenizer, or None when it has no tokenizer files (then the vocab size is checked)."""
    from transformers import AutoTokenizer

    path = Path(source.model_dir)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source.model_dir)
    except OSError:  # a hub model without tokenizer files
        return None


def _exported_step(model_dir: Path) -> int | None:
    path = model_dir / "pretraining_metrics.json"
    return json.loads(path.read_text()).get("step") if path.is_file() else None
