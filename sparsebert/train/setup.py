"""A pre-training run's set-up, on every rank or on none: :func:`setup` meets every rank, opens ``output_dir`` and
this rank's data, builds model and engine, resumes from the checkpoint rank 0 chose (if any), and starts (or
continues) the MLflow run. What it returns, a :class:`Run`, is what :mod:`sparsebert.train.trainer` works on.

Whether the mask searches (stage 1) or is fixed (stage 2) is decided once, by :func:`mask_stage`, before the model
is built; the only freeze here is the one that stage asks for, after every checkpoint or optimizer state is loaded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsebert.faults import StepFaults
from sparsebert.model.modeling import SparseBertForPreTraining
from sparsebert.track.tracker import RunTracker, flatten, git_commit
from sparsebert.train import agreement, build, checkpoint, continuation, run_report
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import PARENT_RUN_ENV, ConfigError, PretrainConfig
from sparsebert.train.corpus import open_reader, open_validation_reader, training_corpus
from sparsebert.train.preemption import StopRequest
from sparsebert.train.recipe import seed_everything
from sparsebert.train.run_outputs import RunOutputs
from sparsebert.train.run_report import report
from sparsebert.train.sparsity_target import SparsityTarget


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights, optimizer and RNG (``train_state.json``)."""

    step: int = 0
    stage: int = 1  # 1 = searching the mask, 2 = fixed/frozen mask
    reader: dict | None = None
    mlflow_run_id: str | None = None
    restarted: bool = False  # stage 2 started from fresh weights (dam.restart_weights)
    skipped_steps: int = 0  # optimizer steps DeepSpeed skipped (fp16 overflow, non-finite gradients)
    world_size: int | None = None  # of the run that wrote the checkpoint
    search_steps: int | None = None  # stage 1's length when the run started (it may derive from max_steps)
    dam_lambda: float = 0.0  # the running part of the sparsity target's multiplier λ (dam.target_sparsity)
    dam_gap: float = 0.0  # the last search step's density gap (λ in force = dam_lambda + gain × gap)


@dataclass
class Run:
    """A pre-training run in progress: what :func:`setup` builds and the loop works on."""

    config: PretrainConfig
    ds: dict[str, Any]  # the completed DeepSpeed config
    out: Path
    reader: Any  # sparsebert.data.ShardReader
    model: SparseBertForPreTraining
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any
    tracker: RunTracker
    state: TrainState
    outputs: RunOutputs  # where out/ goes: nowhere else, or an object store
    val_reader: Any = None  # this rank's share of the held-out split (None: the corpus has none)
    validation: dict[str, float] = field(default_factory=dict)  # the latest held-out metrics
    stop: StopRequest = field(default_factory=StopRequest)
    faults: StepFaults = field(default_factory=lambda: StepFaults(ds_setup.rank(), ds_setup.world_size()))
    lock: Any = None  # rank 0's hold on output_dir (released when the process ends)
    resumed_from: str | None = None  # the checkpoint tag the run resumed from
    started: float = field(default_factory=time.monotonic)
    start_validation: dict[str, float] = field(default_factory=dict)  # held-out metrics before step 1
    target: SparsityTarget | None = None  # dam.target_sparsity's goals and λ's update (None: a fixed λ)

    @property
    def seq_len(self) -> int:
        return self.reader.seq_len

    @property
    def rank0(self) -> bool:
        return ds_setup.rank() == 0


def setup(config: PretrainConfig) -> Run:
    """Meet every rank; then, on every rank or on none (an error on one stops them all, reported once: see
    :mod:`sparsebert.train.agreement`), join the process group, open output_dir and this rank's data, build model
    and engine and resume from the newest checkpoint (if any); then start (or continue) the MLflow run."""
    ds_setup.launch_env()
    store = agreement.rendezvous()  # within the set-up timeout, or every rank stops naming the missing ones
    with agreement.all_or_none():
        ds_setup.init_distributed(store)
        run = _prepare(config)
    _start_tracking(run)
    run_report.report_attention(run)  # printed, and logged to the MLflow run
    return run


def mask_stage(config: PretrainConfig, resumed: TrainState | None) -> int:
    """The run's stage, decided here alone: a resumed run's is its checkpoint's; a new run searches (1) only with
    a learned pattern that is not frozen, and otherwise trains with a fixed mask (2)."""
    if resumed is not None:
        return resumed.stage
    spec = config.model.mask_spec
    return 1 if spec.learned and not spec.params.get("frozen") else 2


def _prepare(config: PretrainConfig) -> Run:
    # One command, read alike on every node (each may read its own copy of a config file).
    agreement.agree(
        "the config",
        config.to_dict(),
        lambda a, b: f"other values of {', '.join(agreement.differing_keys(a, b))}",
    )
    seed_everything(config.train.seed)
    ds = ds_setup.deepspeed_config(config)
    outputs, lock, point = _open_output_dir(config)
    data_dir = training_corpus(config)  # a path or a URI
    reader = open_reader(data_dir, config)  # batches arrive on this rank's device
    _check_fill_mask(config, reader.tokenizer)
    source, mask_note = None, None
    if config.model.init_from:  # continuing (phase 2, long context, any BERT): mask, vocabulary, length
        local = agreement.on_each_node("model.init_from", lambda: continuation.fetch(config.model.init_from))
        source = continuation.locate(config.model.init_from, local)
        config, mask_note = continuation.resolve_mask(config, source)
        continuation.check_fits(source, reader.tokenizer, reader.tokenizer_dir, reader.seq_len, config)
    resumed = _resumed_state(outputs, point, config)
    stage = mask_stage(config, resumed)
    # Built frozen only when stage 2 restarted from fresh weights: α then has no optimizer state to load. Every
    # other stage-2 model is built as it was saved, so its optimizer state loads, and frozen in place below.
    restarted = resumed is not None and resumed.restarted
    build_config = continuation.build_config(config, source, reader.seq_len)
    _check_positions(build_config, reader.seq_len, data_dir)
    tokenizer = reader.tokenizer
    model = build.build_model(build_config, len(tokenizer), tokenizer.pad_token_id, ds, frozen=restarted)
    engine, scheduler = build.build_engine(model, config, ds, restarted=restarted)
    engine.train()  # from_pretrained returns models in eval mode: no dropout, and a DAM mask would not search
    # Training randomness (dropout, Gumbel noise) starts from the seed whatever the ZeRO stage consumed while
    # building the model; ranks get distinct streams (a resume below restores the checkpoint's).
    seed_everything(config.train.seed + ds_setup.rank())
    state = resumed or TrainState(
        stage=stage, world_size=ds_setup.world_size(), search_steps=config.search_steps
    )
    tracker = RunTracker(enabled=ds_setup.rank() == 0 and config.mlflow.enabled, output_dir=outputs.local)
    run = Run(config, ds, outputs.local, reader, model, engine, scheduler, tracker, state, outputs, lock=lock)
    continued_optimizer = None
    if resumed:
        _restore(run, point["tag"])
    elif source is not None and config.model.init_optimizer:
        continued_optimizer = continuation.load_optimizer(engine, source, config)
    if stage == 2 and not model.mask_frozen:
        build.freeze_in_place(model, engine, scheduler)
    run.val_reader = open_validation_reader(data_dir, config, reader)
    run.target = SparsityTarget.of(config.dam, run.state.search_steps or config.search_steps)
    _report_start(run, data_dir, source, continued_optimizer, mask_note)
    return run


def _check_fill_mask(config: PretrainConfig, tokenizer) -> None:
    """``eval.fill_mask``'s sentences need the tokenizer's mask token: found now, not after the whole run."""
    missing = [text for text in config.eval.fill_mask if tokenizer.mask_token not in text]
    if missing:
        raise ConfigError(f"config key 'eval.fill_mask': {missing[0]!r} has no {tokenizer.mask_token}")


def _check_positions(config: PretrainConfig, seq_len: int, data_dir: str) -> None:
    """A sample longer than the model's positions would fail in the first forward pass, deep in the model."""
    positions = config.model.max_position_embeddings
    if seq_len > positions:
        raise ConfigError(
            f"the corpus {data_dir} holds {seq_len}-token samples, more than model.max_position_embeddings="
            f"{positions}; raise model.max_position_embeddings or prepare the corpus with --seq-len {positions}"
        )


def _restore(run: Run, tag: str) -> None:
    """Continue from checkpoint ``tag`` (the one rank 0 chose): weights, optimizer, RNG, data position."""
    state = run.state
    run.outputs.fetch(tag)  # what this machine's ranks read of it, from object storage
    exact = checkpoint.load(run.engine, run.out, tag, state.world_size, run.config.checkpoint.reshard)
    if not exact:  # another world size: new random streams, distinct per rank and from the run's start
        seed_everything(run.config.train.seed + ds_setup.rank() + 1_000_003 * state.step)
    state.world_size = ds_setup.world_size()
    run.reader.load_state_dict(state.reader)  # a global position: any world size continues from it
    run.resumed_from = tag


def _open_output_dir(config: PretrainConfig) -> tuple[RunOutputs, Any, dict]:
    """``output_dir``, held by this run alone, and where the run resumes (:func:`checkpoint.resume_point`, as
    rank 0 reads it; every rank gets rank 0's answer). A local ``output_dir`` must be one directory on every rank
    (each writes its checkpoint part there) and rank 0 locks it. One in object storage is staged on each machine
    by design (no shared filesystem): rank 0 holds its lease and pulls its index, which it reads."""
    outputs = RunOutputs(config.output_dir)
    lock = None
    if outputs.remote:
        outputs.open()
    else:
        agreement.check_shared_dir(outputs.local, "output_dir")
        lock = checkpoint.hold_output_dir(outputs.local) if ds_setup.rank() == 0 else None
    resume = config.checkpoint.resume
    point = agreement.decide("resume point", lambda: checkpoint.resume_point(outputs.local, resume))
    return outputs, lock, point


def _resumed_state(outputs: RunOutputs, point: dict, config: PretrainConfig) -> TrainState | None:
    """The state of the checkpoint the run resumes (``point``, as rank 0 read it), checked against the config
    (newer checkpoints it discards go from the object store too)."""
    if point["tag"] is None:
        return None
    outputs.delete_tags(checkpoint.check_resume(outputs.local, point, config))
    resumed = TrainState(**point["train_state"])
    if resumed.stage == 1 and resumed.search_steps not in (None, config.search_steps):
        raise ConfigError(
            f"checkpoint {point['tag']} is in a DAM search of {resumed.search_steps} steps; this config's search "
            f"is {config.search_steps} (dam.search_fraction of train.max_steps): set "
            f"dam.search_steps={resumed.search_steps} to resume it"
        )
    return resumed


def _report_start(
    run: Run, data_dir: str | Path, source, continued_optimizer: str | None, mask_note: str | None
) -> None:
    config, state, outputs = run.config, run.state, run.outputs
    staged = f" (staged in {run.out})" if outputs.remote else ""
    report(f"output: {outputs.where()}{staged}  |  data: {data_dir}  |  world size {ds_setup.world_size()}")
    report(
        f"device: {ds_setup.device()}  |  ZeRO stage {ds_setup.zero_stage(run.ds)}  |  {ds_setup.precision(run.ds)}",
    )
    if run.resumed_from:
        report(f"resumed from {run.resumed_from} at step {state.step} (stage {state.stage})")
    elif source is not None:
        moments = (
            f"the optimizer moments of {continued_optimizer}" if continued_optimizer else "a fresh optimizer"
        )
        frozen = " (frozen)" if run.model.mask_frozen else ""
        report(
            f"continuing from {source.model_dir}: its weights, mask {run.model.config.mask_spec.name}{frozen}, "
            f"{moments}; a fresh LR schedule ({config.train.warmup_steps} warm-up steps) at seq_len {run.seq_len}"
        )
    if mask_note:
        report(f"warning: {mask_note}")
    if run.val_reader is None:
        report(
            f"no held-out evaluation: {data_dir} has no validation split (data_prep --validation-fraction)"
        )


def _start_tracking(run: Run) -> None:
    config, tracker = run.config, run.tracker
    tracker.start(
        config.mlflow.tracking_uri, config.mlflow.experiment, config.mlflow.run_name or run.out.name,
        run.state.mlflow_run_id, _params(config, run.ds),
    )  # fmt: skip
    run.state.mlflow_run_id = tracker.run_id
    if run.resumed_from is None:
        tracker.log_configs(config.to_dict(), run.ds)
    if parent := config.mlflow.parent_run_id or os.environ.get(PARENT_RUN_ENV):
        tracker.set_tags({"mlflow.parentRunId": parent})  # shown nested under it (a study's run)


def _params(config: PretrainConfig, ds: dict) -> dict:
    params = flatten(config.to_dict())
    params.update(flatten(ds, "deepspeed."))
    params.update(
        world_size=ds_setup.world_size(), git_commit=git_commit(), precision=ds_setup.precision(ds),
        search_steps=config.search_steps,
        device_type=ds_setup.device().type,
    )  # fmt: skip
    return params
