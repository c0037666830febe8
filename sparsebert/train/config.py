"""The pre-training config: one schema, documented defaults, YAML files and ``dotted.key=value`` overrides.

Every key lives in a dataclass below with its default and a one-line ``help`` (the schema machinery, shared with
data_prep's and eval's options, is :mod:`sparsebert.schema`); ``python
sparsebert/pretrain.py --help-config`` prints them all. Unknown keys and values of the wrong type are
errors that name the key. Batch sizes, gradient accumulation and clipping live here only: the DeepSpeed
JSON must not repeat them (see :func:`sparsebert.train.distributed.deepspeed_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsebert import choices, schema
from sparsebert.schema import ConfigError

if TYPE_CHECKING:
    from sparsebert.model.masks import MaskSpec

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "tiny_cpu"
# mlflow.parent_run_id's fallback. The deepspeed launcher passes MLFLOW* variables to the nodes it starts over SSH;
# and a variable, unlike a key, leaves the config the same on every node (the ranks compare it).
PARENT_RUN_ENV = "MLFLOW_PARENT_RUN_ID"

# BERT's official sizes (Turc et al. 2019 for the small ones): layers, hidden, heads.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def _f(default: Any, help: str, one_of: Any = None, neutral: bool = False) -> Any:
    """A documented config field (:func:`sparsebert.schema.setting`); ``one_of`` (a list of names, read when a
    config is loaded) restricts it; ``neutral`` fields (where output goes, how often to log or save, how long to
    train) may change when a run resumes, every other field changes what the run computes (:func:`run_changes`)."""
    return schema.setting(default, help, choices=one_of, neutral=neutral)


@dataclass
class ModelConfig:
    init_from: str | None = _f(
        None,
        "continue from this HF BERT directory (a run's final/, a save_pretrained dir), hub name, or a "
        "pre-training run's output_dir (its final/); null = random init. docs/pretraining.md: Two-phase pre-training",
    )
    init_mask: str = _f(
        "auto",
        "the mask of an init_from checkpoint: auto (kept when attention_pattern is dense or agrees with it, an "
        "error when it contradicts it), checkpoint (kept, whatever attention_pattern says), or config",
        choices.INIT_MASKS,
    )
    init_optimizer: bool = _f(
        False,
        "also continue the optimizer moments of init_from's pre-training run (its newest DeepSpeed "
        "checkpoint); the LR schedule, warm-up and step count start fresh",
    )
    size: str = _f("tiny", "architecture preset (BERT's official sizes)", list(MODEL_SIZES))
    num_layers: int | None = _f(None, "override the preset's number of layers")
    hidden_size: int | None = _f(None, "override the preset's hidden size")
    num_heads: int | None = _f(None, "override the preset's number of attention heads")
    intermediate_size: int | None = _f(None, "override the preset's feed-forward size")
    max_position_embeddings: int = _f(512, "longest sequence the position embeddings cover")
    hidden_dropout: float = _f(0.1, "dropout on hidden states")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities (the flex backend applies none)")
    attention_pattern: str | dict = _f(
        "dense", "mask pattern spec: a name, or {name: ..., params...}; see docs/model.md: Patterns"
    )
    attention_backend: str = _f(
        "auto", "attention implementation; auto picks per mask and device", choices.ATTENTION_BACKENDS
    )
    mlm_logits: str = _f(
        "masked_only", "MLM vocabulary logits at masked positions only (faster) or all", choices.MLM_LOGITS
    )
    gradient_checkpointing: bool = _f(
        False,
        "recompute each encoder layer's activations in the backward pass: less memory, more compute",
        neutral=True,  # how a step runs, not what it computes: may be switched on when a resumed run runs out
    )

    @functools.cached_property
    def mask_spec(self) -> MaskSpec:
        """``attention_pattern`` parsed (validated, defaults filled in) once: a :class:`~sparsebert.model.masks.MaskSpec`."""
        from sparsebert.model.masks import parse_spec  # torch: only when a config is used, not to read one

        return parse_spec(self.attention_pattern)


@dataclass
class DataConfig:
    path: str | None = _f(
        None,
        "prepared corpus (python -m data_prep): a directory or s3://bucket/path, gs://bucket/path; null = the "
        "embedded Python-docs corpus",
    )
    mlm_probability: float = _f(0.15, "fraction of tokens predicted by the MLM objective")
    whole_word_masking: bool = _f(False, "mask whole words rather than word pieces")
    nsp: bool = _f(True, "train next-sentence prediction (needs shards prepared with NSP pairs)")
    document_mask: bool = _f(
        False,
        "attention never crosses a document boundary inside a packed sample (needs a corpus packed with "
        "--packing full_sentences or padding_free, which records the boundaries; data.nsp=false)",
    )
    prefetch: int = _f(2, "batches each rank prepares ahead", neutral=True)
    lanes: int = _f(
        64,
        "the epoch's sample stream is cut into this many lanes; a rank reads only its lanes' row groups when the "
        "world size divides it (worlds of 3·2^k ranks: 192)",
    )
    log_sample_ids: bool = _f(
        False, "append each step's sample ids to output_dir/samples.rank{r}.jsonl (audits)", neutral=True
    )


@dataclass
class TrainConfig:
    max_steps: int = _f(300, "optimizer steps in total, both DAM stages included", neutral=True)
    micro_batch_size: int = _f(16, "sequences per rank per forward pass")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    optimizer: str = _f("lamb", "lamb (the paper's) or adamw", choices.OPTIMIZERS)
    lr: float = _f(1e-3, "peak learning rate")
    dam_lr: float | None = _f(None, "learning rate of the DAM logits α; null = lr")
    weight_decay: float = _f(0.01, "weight decay (never on biases, LayerNorm or α)")
    betas: list = _f([0.9, 0.999], "Adam/LAMB betas")
    eps: float = _f(1e-6, "Adam/LAMB epsilon")
    warmup_steps: int = _f(30, "linear warm-up steps")
    decay: str = _f("linear", "after warm-up: linear, polynomial or constant", choices.LR_DECAYS)
    poly_power: float = _f(0.5, "power of the polynomial decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(42, "seed for weights, data order, masking and Gumbel noise")
    compile: bool = _f(
        False, "torch.compile each encoder layer (masks and attention backends stay eager)", neutral=True
    )
    log_every: int = _f(10, "steps between metric logs", neutral=True)
    peak_tflops: float | None = _f(
        None, "one device's peak TFLOP/s for MFU; null = the GPU's known dense bf16 peak", neutral=True
    )
    max_bad_steps: int = _f(
        20,
        "stop after this many consecutive skipped steps (non-finite loss or gradients, fp16 overflow)",
        neutral=True,
    )


@dataclass
class DamConfig:
    search_steps: int | None = _f(
        None,
        "stage-1 steps searching a DAM mask, then frozen (fixed patterns skip stage 1); "
        "null = dam.search_fraction × train.max_steps, so train.max_steps alone shortens a run",
    )
    search_fraction: float = _f(0.4, "the search's share of train.max_steps when dam.search_steps is null")
    tau_start: float | None = _f(
        None, "anneal the Gumbel temperature from this ... (null = the pattern's tau)"
    )
    tau_end: float | None = _f(None, "... to this at the end of the search (null = no annealing)")
    restart_weights: bool = _f(
        False, "stage 2 restarts from fresh weights (and optimizer) instead of continuing"
    )
    freeze: bool = _f(
        True,
        "freeze the mask after the search (the paper's two stages); false: search to the end of training, as the "
        "authors' released code does (fine-tuning then freezes it at 1[α > 0])",
    )
    target_sparsity: float | None = _f(
        None,
        "aim the search at this sparsity (e.g. 0.9): λ becomes a Lagrange multiplier driven by the gap between the "
        "expected density and the target, and the frozen mask meets the target; null = the pattern's fixed λ",
    )
    lambda_lr: float = _f(
        2.0, "with dam.target_sparsity: λ's running part rises by lambda_lr × the density gap after each step"
    )
    lambda_gain: float = _f(
        100.0, "with dam.target_sparsity: λ in force = its running part + lambda_gain × the last density gap"
    )
    target_warmup: float = _f(
        0.5,
        "with dam.target_sparsity: the share of the search over which the target moves from the starting "
        "sparsity (0.5: every α starts near 0) to dam.target_sparsity",
    )
    alpha_optimizer: str = _f(
        "adam",
        "how α is trained: adam (its own Adam steps at train.dam_lr) or model (the model's optimizer, LAMB's trust "
        "ratio included, at train.lr, as the authors' code)",
        choices.ALPHA_OPTIMIZERS,
    )
    clip_alpha: bool = _f(
        True,
        "train.grad_clip covers α's gradient too (the authors' code); false: α's gradient is never clipped",
    )
    snapshot_every: int = _f(
        0,
        "steps between snapshots of σ(α) during the search (importance by distance, in output_dir/tracking and "
        "MLflow: importance/); 0 = off",
        neutral=True,
    )


@dataclass
class EvalConfig:
    every: int = _f(
        100,
        "steps between held-out evaluations (when the corpus has a validation split; 0 = off)",
        neutral=True,
    )
    max_batches: int | None = _f(
        None, "batches per rank per evaluation; null = the whole split", neutral=True
    )
    fill_mask: list = _f(
        [], "sentences with [MASK] that the final model fills in, printed at the end of the run", neutral=True
    )


@dataclass
class CheckpointConfig:
    every: int = _f(100, "steps between DeepSpeed checkpoints (0 = only at the end)", neutral=True)
    keep_last: int = _f(2, "checkpoints kept; older ones are deleted", neutral=True)
    resume: str = _f(
        "auto", "auto (resume when output_dir has a checkpoint), never, or a checkpoint tag", neutral=True
    )
    allow_config_change: bool = _f(
        False, "resume although keys that change the run (model, data, optimizer, ...) differ", neutral=True
    )
    reshard: bool = _f(
        False,
        "resume on another number of ranks: weights, schedule and data position carry over, the optimizer "
        "state starts fresh",
        neutral=True,
    )
    discard_newer: bool = _f(
        False, "resuming an older tag: delete the checkpoints newer than it (kept otherwise)", neutral=True
    )


@dataclass
class MlflowConfig:
    enabled: bool = _f(True, "log the run to MLflow (rank 0 only)", neutral=True)
    experiment: str = _f("sparsebert-pretrain", "MLflow experiment name", neutral=True)
    run_name: str | None = _f(None, "MLflow run name; null = the output directory's name", neutral=True)
    tracking_uri: str | None = _f(
        None, "null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir", neutral=True
    )
    parent_run_id: str | None = _f(
        None,
        "nest the run under this MLflow run (a study's); null = $MLFLOW_PARENT_RUN_ID, else none",
        neutral=True,
    )


@dataclass
class ExportConfig:
    standalone: bool = _f(
        True,
        "final/ carries the model code (sparsebert_*.py and an auto_map), so transformers alone loads it with "
        "trust_remote_code=True; false: loading it needs sparsebert (and a user pattern's code)",
        neutral=True,
    )
    push_to_hub: str | None = _f(
        None,
        "upload final/ with its model card to this Hugging Face Hub repo (org/name) at the end; the token from "
        "HF_TOKEN or `hf auth login`",
        neutral=True,
    )
    private: bool = _f(True, "create the Hub repo private", neutral=True)


@dataclass
class PretrainConfig:
    output_dir: str = _f(
        "runs/demo",
        "checkpoints, the final model and logs go here: a directory, or s3://bucket/path, gs://bucket/path (the run "
        "works in a local staging directory and uploads; docs/pretraining.md: Object storage)",
        neutral=True,
    )
    deepspeed_config: str = _f("ds_configs/cpu.json", "DeepSpeed JSON (ZeRO stage, precision, offload)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dam: DamConfig = field(default_factory=DamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def search_steps(self) -> int:
        """Stage 1's length: ``dam.search_steps``, else ``dam.search_fraction`` of ``train.max_steps`` (at least
        one step, and one step short of the run); the whole run with ``dam.freeze`` false; 0 for a fixed pattern or
        a frozen DAM mask."""
        spec = self.model.mask_spec
        if not spec.learned or spec.params["frozen"]:
            return 0
        if not self.dam.freeze:
            return self.train.max_steps
        if self.dam.search_steps is not None:
            return self.dam.search_steps
        return min(max(1, round(self.dam.search_fraction * self.train.max_steps)), self.train.max_steps - 1)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PretrainConfig:
    """Defaults ← preset/YAML file ← ``dotted.key=value`` overrides, validated."""
    data = schema.read_yaml(_resolve_path(path)) if path is not None else {}
    config = schema.build(PretrainConfig, schema.apply_overrides(data, overrides))
    _check_semantics(config)
    return config


def run_changes(saved: dict[str, Any], config: PretrainConfig) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's config (``saved``, as ``to_dict()`` gave it)
    and ``config``, leaving out the neutral ones (where output goes, logging and checkpoint cadence, length)."""
    changed = []

    def walk(cls, old: dict[str, Any], new: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, value = f"{prefix}{f.name}", getattr(new, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], old.get(f.name, {}), value, f"{key}.")
            elif not f.metadata.get("neutral") and old.get(f.name, schema.default_of(f)) != value:
                changed.append(key)

    walk(PretrainConfig, saved, config, "")
    return changed


def describe(config: PretrainConfig | None = None, source: str | None = None) -> str:
    """Every key with its type, meaning and value, for ``--help-config``: the value ``config`` (loaded from
    ``source``) gives it, marked where that differs from the built-in default."""
    return schema.describe(config or PretrainConfig(), source)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


# --- internals -------------------------------------------------------------------------------------------


def _resolve_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    preset = PRESETS_DIR / f"{path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config file {str(path)!r} not found (presets: {', '.join(presets())})")


def _check_semantics(config: PretrainConfig) -> None:
    t = config.train
    positive = {
        "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum_steps": t.grad_accum_steps,
        "train.log_every": t.log_every,
        "checkpoint.keep_last": config.checkpoint.keep_last,
        "data.lanes": config.data.lanes,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
    if not (
        isinstance(t.betas, list) and len(t.betas) == 2 and all(isinstance(b, (int, float)) for b in t.betas)
    ):
        raise ConfigError(f"config key 'train.betas' must be a list of two numbers, got {t.betas!r}")
    try:
        spec = config.model.mask_spec
    except ValueError as err:
        raise ConfigError(f"config key 'model.attention_pattern': {err}") from err
    explicit, fraction = config.dam.search_steps, config.dam.search_fraction
    if explicit is not None and explicit < 0:
        raise ConfigError(f"config key 'dam.search_steps' must be >= 0, got {explicit}")
    if not 0 < fraction < 1:
        raise ConfigError(f"config key 'dam.search_fraction' must be between 0 and 1, got {fraction}")
    if spec.learned and not spec.params["frozen"]:
        if t.max_steps < 2:
            raise ConfigError(f"config key 'train.max_steps' must be >= 2 to search a {spec.name} mask")
        if explicit is not None and not 0 < explicit < t.max_steps:
            raise ConfigError(
                f"config key 'dam.search_steps' must be between 1 and train.max_steps - 1 ({t.max_steps - 1}) "
                f"to search a {spec.name} mask, got {explicit} (or null: dam.search_fraction of the run)"
            )
    if config.data.document_mask and config.data.nsp:
        raise ConfigError(
            "config key 'data.document_mask' keeps packed documents apart, which NSP samples are not (their A and B "
            "pair may come from two documents on purpose): set data.nsp=false and use a full_sentences or "
            "padding_free corpus"
        )
    if not all(isinstance(text, str) for text in config.eval.fill_mask):
        raise ConfigError(
            f"config key 'eval.fill_mask' must be a list of sentences, got {config.eval.fill_mask!r}"
        )
    _check_dam(config, spec)
    if (config.dam.tau_start is None) != (config.dam.tau_end is None):
        raise ConfigError("config keys 'dam.tau_start' and 'dam.tau_end' must be set together")
    if config.dam.snapshot_every < 0:
        raise ConfigError(f"config key 'dam.snapshot_every' must be >= 0, got {config.dam.snapshot_every}")
    if config.checkpoint.every < 0:
        raise ConfigError(f"config key 'checkpoint.every' must be >= 0, got {config.checkpoint.every}")
    _check_locations(config)
    _check_export(config)
    m = config.model
    if not m.init_from and (m.init_optimizer or m.init_mask != "auto"):
        key = "model.init_optimizer" if m.init_optimizer else "model.init_mask"
        raise ConfigError(f"config key {key!r} needs model.init_from (a checkpoint to continue from)")


def _check_export(config: PretrainConfig) -> None:
    """What the export can ship and where it may go, checked before the run rather than at its end."""
    from sparsebert.export.hub import check_repo_id
    from sparsebert.model.masks import is_builtin

    if config.export.standalone and not is_builtin(config.model.mask_spec):
        raise ConfigError(
            f"config key 'model.attention_pattern': {config.model.mask_spec.name!r} is your own code, which the "
            "standalone export cannot ship; set export.standalone=false (final/ then needs sparsebert and that code)"
        )
    if config.export.push_to_hub is not None:
        try:
            check_repo_id(config.export.push_to_hub, "config key 'export.push_to_hub'")
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_dam(config: PretrainConfig, spec: MaskSpec) -> None:
    """The DAM keys: a target, the α recipe and the search's length must fit the pattern and each other."""
    dam, searching = config.dam, spec.learned and not spec.params["frozen"]
    if dam.target_sparsity is not None:
        if not 0 < dam.target_sparsity < 1:
            raise ConfigError(
                f"config key 'dam.target_sparsity' must be between 0 and 1, got {dam.target_sparsity}"
            )
        if not searching:
            raise ConfigError(
                f"config key 'dam.target_sparsity' steers a DAM search, but model.attention_pattern {spec.name!r} "
                "does not search (a fixed pattern or a frozen mask)"
            )
    for key in ("lambda_lr", "lambda_gain"):
        if getattr(dam, key) < 0:
            raise ConfigError(f"config key 'dam.{key}' must be >= 0, got {getattr(dam, key)}")
    if not 0 <= dam.target_warmup <= 1:
        raise ConfigError(f"config key 'dam.target_warmup' must be between 0 and 1, got {dam.target_warmup}")
    if dam.alpha_optimizer == "model" and config.train.dam_lr is not None:
        raise ConfigError(
            "config key 'train.dam_lr' must be null with dam.alpha_optimizer=model (α then trains at train.lr, "
            f"as the model does), got {config.train.dam_lr}"
        )
    if not dam.freeze and dam.search_steps is not None:
        raise ConfigError(
            "config key 'dam.search_steps' must be null with dam.freeze=false (the search runs to the end)"
        )


def _check_locations(config: PretrainConfig) -> None:
    """Where data and outputs live: a local path or an object store URI (``sparsebert.storage``); anything else
    is refused here, before a run writes anything (never a local folder named ``s3:``)."""
    from sparsebert.storage import UnsupportedLocation, parse

    places = {
        "output_dir": config.output_dir,
        "data.path": config.data.path,
        "model.init_from": config.model.init_from,
    }
    for key, value in places.items():
        if value is None:
            continue
        try:
            location = parse(value, f"config key {key!r}")
        except UnsupportedLocation as err:
            raise ConfigError(str(err)) from None
        if key == "model.init_from" and location.remote:
            raise ConfigError(
                f"config key 'model.init_from': {value!r} is in object storage; download that model directory "
                "(or the run's final/) and give its local path"
            )
