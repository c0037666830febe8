"""A pre-training run, read top to bottom: :func:`pretrain` = :func:`setup` (distributed init, data, model, engine,
resume, tracking) → :func:`train` ((stage 1, DAM patterns only) search the mask for the search length →
:func:`end_search` freezes it → (stage 2) train with the fixed mask to ``train.max_steps``, one
:func:`train_step` at a time, checkpointing every ``checkpoint.every`` steps) → :func:`finish` (the last
checkpoint, the export to ``output_dir/final``, the summary). A restarted command resumes from the newest
checkpoint. An ``output_dir`` in object storage (``s3://``, ``gs://``) is worked on in a node-local staging
directory that :class:`~sparsebert.train.run_outputs.RunOutputs` keeps in step with the store. The command line is
``sparsebert/pretrain.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsebert import console
from sparsebert.data import model_inputs
from sparsebert.faults import step_fault
from sparsebert.model.masks import sparsity
from sparsebert.model.modeling import SparseBertForPreTraining
from sparsebert.track.mlflow_store import tracking_uri
from sparsebert.track.tracker import RunTracker, flatten, git_commit
from sparsebert.train import agreement, build, checkpoint, continuation, run_report, summary
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import ConfigError, DamConfig, PretrainConfig
from sparsebert.train.corpus import open_reader, open_validation_reader, training_corpus
from sparsebert.train.meter import Meter
from sparsebert.train.preemption import StopRequest
from sparsebert.train.recipe import seed_everything
from sparsebert.train.run_outputs import RunOutputs, samples_log
from sparsebert.train.run_report import report
from sparsebert.train.validation import evaluate


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
    lock: Any = None  # rank 0's hold on output_dir (released when the process ends)
    resumed_from: str | None = None  # the checkpoint tag the run resumed from
    started: float = field(default_factory=time.monotonic)
    start_validation: dict[str, float] = field(default_factory=dict)  # held-out metrics before step 1

    @property
    def seq_len(self) -> int:
        return self.reader.seq_len

    @property
    def rank0(self) -> bool:
        return ds_setup.rank() == 0


def pretrain(config: PretrainConfig) -> int:
    """The whole run; 0 when it finished or stopped cleanly at a signal (checkpointed, resumable)."""
    run = setup(config)
    try:
        completed = train(run)
    except BaseException:
        run.tracker.end("FAILED")  # the MLflow run says so; a resume marks it running again
        run.outputs.close(together=False)
        raise
    if completed:
        finish(run)
    else:
        run.tracker.end("KILLED")  # stopped by a signal, checkpointed: the same command resumes it
    run.outputs.close()
    return 0


def setup(config: PretrainConfig) -> Run:
    """Meet every rank; then, on every rank or on none (an error on one stops them all, reported once: see
    :mod:`sparsebert.train.agreement`), join the process group, open output_dir and this rank's data, build model and
    engine and resume from the newest checkpoint (if any); then start (or continue) the MLflow run."""
    ds_setup.launch_env()
    store = agreement.rendezvous()  # within the set-up timeout, or every rank stops naming the missing ones
    with agreement.all_or_none():
        ds_setup.init_distributed(store)
        run = _prepare(config)
    _start_tracking(run)
    run_report.report_attention(run)  # printed, and logged to the MLflow run
    return run


def _prepare(config: PretrainConfig) -> Run:
    # One command, read alike on every node (each may read its own copy of a config file).
    agreement.agree(
        "the config",
        config.to_dict(),
        lambda a, b: f"other values of {', '.join(agreement.differing_keys(a, b))}",
    )
    rank0 = ds_setup.rank() == 0
    seed_everything(config.train.seed)
    ds = ds_setup.deepspeed_config(config)
    outputs, lock, point = _open_output_dir(config)
    out = outputs.local  # output_dir itself, or the staging directory of one in object storage
    data_dir = training_corpus(config)  # a path or a URI
    reader = open_reader(data_dir, config)  # batches arrive on this rank's device

    tokenizer = reader.tokenizer
    missing = [text for text in config.eval.fill_mask if tokenizer.mask_token not in text]
    if missing:  # found now, not after the whole run
        raise ConfigError(f"config key 'eval.fill_mask': {missing[0]!r} has no {tokenizer.mask_token}")
    source, mask_note = None, None
    if config.model.init_from:  # continuing (phase 2, long context, any BERT): mask, vocabulary, length
        local = agreement.on_each_node("model.init_from", lambda: continuation.fetch(config.model.init_from))
        source = continuation.locate(config.model.init_from, local)
        config, mask_note = continuation.resolve_mask(config, source)
        continuation.check_fits(source, tokenizer, reader.tokenizer_dir, reader.seq_len, config)
    resumed = _resumed_state(outputs, point, config)
    restarted = resumed is not None and resumed.restarted
    model = build.build_model(
        continuation.build_config(config, source, reader.seq_len),
        len(tokenizer),
        tokenizer.pad_token_id,
        ds,
        frozen=restarted,
    )
    engine, scheduler = build.build_engine(model, config, ds, restarted=restarted)
    engine.train()  # from_pretrained returns models in eval mode: no dropout, and a DAM mask would not search
    continued_optimizer = None
    if source is not None and config.model.init_optimizer and not resumed:
        continued_optimizer = continuation.load_optimizer(engine, source, config)
    if config.model.mask_spec.params.get("frozen") and not model.mask_frozen:  # built so α's moments load
        build.freeze_in_place(model, engine, scheduler)
    # Training randomness (dropout, Gumbel noise) starts from the seed whatever the ZeRO stage consumed
    # while building the model; ranks get distinct streams.
    seed_everything(config.train.seed + ds_setup.rank())
    state = resumed or TrainState(
        stage=2 if model.mask_frozen else 1,
        world_size=ds_setup.world_size(),
        search_steps=config.search_steps,
    )
    tracker = RunTracker(enabled=rank0 and config.mlflow.enabled, output_dir=out)  # started after set-up
    run = Run(config, ds, out, reader, model, engine, scheduler, tracker, state, outputs, lock=lock)
    if resumed:
        _restore(run, point["tag"])
    run.val_reader = open_validation_reader(data_dir, config, reader)
    _report_start(run, data_dir, source, continued_optimizer, mask_note)
    return run


def _restore(run: Run, tag: str) -> None:
    """Continue from checkpoint ``tag`` (the one rank 0 chose): weights, optimizer, RNG, data position."""
    state = run.state
    run.outputs.fetch(tag)  # what this machine's ranks read of it, from object storage
    exact = checkpoint.load(run.engine, run.out, tag, state.world_size, run.config.checkpoint.reshard)
    if not exact:  # another world size: new random streams, distinct per rank and from the run's start
        seed_everything(run.config.train.seed + ds_setup.rank() + 1_000_003 * state.step)
    state.world_size = ds_setup.world_size()
    run.reader.load_state_dict(state.reader)  # a global position: any world size continues from it
    if state.stage == 2 and not run.model.mask_frozen:  # the search ended before the checkpoint
        build.freeze_in_place(run.model, run.engine, run.scheduler)
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


def train(run: Run) -> bool:
    """Train to ``train.max_steps``: the DAM search first (stage 1), then the fixed mask (stage 2). False when a
    stop signal ended it early (checkpointed: the same command resumes)."""
    config, state = run.config, run.state
    progress = console.progress(config.train.max_steps, state.step, enabled=run.rank0, desc="steps")
    if state.step == 0:
        validate(run)  # where the model starts, for the closing summary and the curves
        run.start_validation = dict(run.validation)
    meter = Meter()
    batches = iter(run.reader)
    poison_step = step_fault("nonfinite_at_step") if run.rank0 else 0  # tests: the skipped-step path
    poison_from = step_fault("nonfinite_from_step") if run.rank0 else 0
    sigterm_at = step_fault("sigterm_at_step") if ds_setup.rank() == ds_setup.world_size() - 1 else 0
    bad_streak = 0
    while state.step < config.train.max_steps:
        if state.stage == 1 and state.step >= config.search_steps:
            end_search(run)
        if state.stage == 1:
            _anneal_temperature(run.model, config.dam, state.step, config.search_steps)
        poison = poison_step == state.step + 1 or 0 < poison_from <= state.step + 1
        poison_step = 0 if poison_step == state.step + 1 else poison_step
        applied = train_step(run, batches, meter, poison)
        bad_streak = 0 if applied else bad_streak + 1
        if bad_streak >= config.train.max_bad_steps:
            _stop_on_bad_steps(run, bad_streak)
        saved = False
        if applied:
            progress.update(1)
            if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
                _log(run, meter, progress)
            if config.eval.every and state.step % config.eval.every == 0:
                validate(run)
            if config.checkpoint.every and state.step % config.checkpoint.every == 0:
                _save(run)
                saved = True
            if run.rank0 and state.step == step_fault("crash_after_step"):  # tests: the resume path
                os.kill(os.getpid(), signal.SIGKILL)
            if sigterm_at and state.step == sigterm_at:  # tests: preemption, a real signal to the last rank
                os.kill(os.getpid(), signal.SIGTERM)
        if run.stop.agreed():  # every rank, at this same step boundary
            if meter.count:
                _log(run, meter, progress)  # the interval so far: its steps are not replayed on resume
            if not saved:
                _save(run)
            progress.close()
            report(
                f"stopped by {run.stop.reason} at step {state.step}: checkpoint written to {run.out}; "
                "run the same command to resume",
            )
            return False
    progress.close()
    return True


def _log(run: Run, meter: Meter, progress) -> None:
    metrics = run_report.with_mfu(run, meter.flush())
    metrics.update(run_report.state_metrics(run))
    run.tracker.log_metrics(metrics, run.state.step)
    shown = {
        "stage": run.state.stage,
        "loss": f"{metrics['loss']:.3f}",
        "mlm_acc": f"{metrics['mlm_accuracy']:.3f}",
    }
    if "mask_penalty" in metrics and run.state.stage == 1:  # the loss holds λ·‖M‖₁ while the mask is searched
        shown["of_it_mask_penalty"] = f"{metrics['mask_penalty']:.3f}"
    progress.set_postfix(**shown, tok_s=f"{metrics['tokens_per_s']:.0f}")


def validate(run: Run) -> None:
    """Held-out MLM (and NSP) loss and accuracy of the current weights, on every rank; rank 0 logs them."""
    if run.val_reader is None:
        return
    run.validation = evaluate(
        run.engine, run.val_reader, nsp=run.config.data.nsp, max_batches=run.config.eval.max_batches
    )
    run.tracker.log_metrics(run.validation, run.state.step)
    shown = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in run.validation.items())
    report(f"\nstep {run.state.step}, held-out: {shown}")


def train_step(run: Run, batches, meter: Meter, poison: bool = False) -> bool:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches; False when DeepSpeed skipped it.

    A skipped update (fp16 overflow, or a non-finite gradient) did not advance the LR schedule, and the step
    count, which drives the DAM schedule, checkpoints and logs, does not advance either; its batches are spent.
    ``poison`` makes the first micro-batch's loss infinite (the tests' way to cause a skip).
    """
    engine, state = run.engine, run.state
    sample_ids = []
    for _ in range(run.config.train.grad_accum_steps):
        batch = next(batches)
        outputs = engine(**model_inputs(batch, run.config.data.nsp))
        loss = outputs.loss
        if poison:
            loss, poison = loss * float("inf"), False
        engine.backward(loss)
        engine.step()
        meter.add(outputs, batch)
        sample_ids += batch["sample_index"].tolist()
    applied = engine.was_step_applied()
    if run.config.data.log_sample_ids:
        _log_samples(run.out, state.step + 1, sample_ids, applied)
    meter.end_step(applied)
    if applied:
        state.step += 1
    else:
        state.skipped_steps += 1
    return applied


def end_search(run: Run) -> None:
    """Stage 1 → 2: freeze the mask (checked identical on every rank), log it and its importance, then continue
    with the same weights or, with ``dam.restart_weights``, from fresh ones (and a fresh optimizer)."""
    config, model, ds = run.config, run.model, run.ds
    with ds_setup.gathered(model.mask_source.parameters(), ds):
        importance = model.mask_importance(run.seq_len)
        learned = {k: v.detach().clone() for k, v in model.mask_source.state_dict().items()}
    if config.dam.restart_weights:
        run.engine.destroy()
        model = build.build_model(config, model.config.vocab_size, model.config.pad_token_id, ds, frozen=True)
        with ds_setup.gathered(model.mask_source.parameters(), ds, modifier_rank=0), torch.no_grad():
            model.mask_source.load_state_dict(learned)
        run.engine, run.scheduler = build.build_engine(model, config, ds, restarted=True)
        run.engine.train()
        run.model = model
    else:
        build.freeze_in_place(model, run.engine, run.scheduler)
    run.state.stage, run.state.restarted = 2, config.dam.restart_weights
    mask = model.current_mask(run.seq_len)
    _save_rank_mask(run.out, "stage1_frozen", mask)
    if not ds_setup.same_on_all_ranks(mask):
        raise RuntimeError("the frozen DAM mask differs between ranks; refusing to continue")
    run.tracker.log_mask("stage1_frozen", mask, importance=importance)
    run.tracker.log_metrics({"frozen_sparsity": sparsity(mask)}, step=config.search_steps)
    report(f"\nDAM search done: mask frozen at sparsity {sparsity(mask):.1%}")
    run_report.report_attention(run)


def finish(run: Run) -> None:
    """The last checkpoint, the final mask, and the HF-format export to ``output_dir/final``."""
    config, state, tracker = run.config, run.state, run.tracker
    if not (config.checkpoint.every and state.step % config.checkpoint.every == 0):
        _save(run)
    if not (config.eval.every and state.step % config.eval.every == 0):
        validate(run)  # the final model's held-out numbers, which final/ records
    final_mask = run.model.current_mask(run.seq_len)
    _save_rank_mask(run.out, "final", final_mask)
    tracker.log_mask("final", final_mask)
    run.model.config.mlm_logits = "all"  # the exported model keeps transformers' output semantics
    final = run.out / "final"
    checkpoint.export_final(
        run.model,
        run.ds,
        final,
        run.reader.tokenizer_dir,
        tracker.run_id,
        {"step": state.step, **run.validation},
    )
    run.outputs.push_final(final)
    tracker.set_tags({"final_model_dir": run.outputs.where("final"), "final_sparsity": sparsity(final_mask)})
    tracker.end()
    _summarize(run, run.outputs.where("final"), sparsity(final_mask))


def _summarize(run: Run, final: str, final_sparsity: float) -> None:
    """The closing summary, then the final model filling in ``eval.fill_mask``'s sentences (rank 0 prints)."""
    config, tracker = run.config, run.tracker
    # Every rank runs the examples: under ZeRO-3 a forward pass gathers each layer's weights from all ranks.
    filled = [
        summary.fill_mask(run.engine.module, run.reader.tokenizer, text) for text in config.eval.fill_mask
    ]
    if not run.rank0:
        return
    lines = summary.summary_lines(
        steps=run.state.step,
        search_steps=config.search_steps,
        seconds=time.monotonic() - run.started,
        start=run.start_validation,
        end=run.validation,
        sparsity=final_sparsity,
        pattern=config.model.mask_spec.name,
        final_dir=final,
        mlflow={
            "run_id": tracker.run_id or "", "experiment": config.mlflow.experiment, "out": run.out,
            "uri": tracking_uri(config.mlflow.tracking_uri),
        },
    )  # fmt: skip
    report("\n" + "\n".join(lines + filled))


# --- building blocks ---------------------------------------------------------------------------------------


def _anneal_temperature(model, dam: DamConfig, step: int, search_steps: int) -> None:
    """Exponential τ annealing from dam.tau_start to dam.tau_end over the search."""
    if dam.tau_start is not None:
        progress = step / max(1, search_steps - 1)
        model.mask_temperature = dam.tau_start * (dam.tau_end / dam.tau_start) ** min(progress, 1.0)


def _save(run: Run) -> None:
    """A checkpoint of the run, never of non-finite weights (the newest good one stays the newest)."""
    if ds_setup.any_rank(not checkpoint.weights_finite(run.engine.module)):
        raise FloatingPointError(
            f"the weights are not finite at step {run.state.step}; no checkpoint written. "
            f"{_last_good(run)}: lower train.lr (or check the data) and resume from it"
        )
    state = replace(run.state, reader=run.reader.state_dict())
    keep = run.config.checkpoint.keep_last
    tag = checkpoint.save(run.engine, run.out, state.step, vars(state), keep, run.config.to_dict())
    run.outputs.push_checkpoint(tag, keep)


def _last_good(run: Run) -> str:
    tag = checkpoint.latest_tag(run.out)
    where = run.outputs.where("checkpoints")
    return f"the last good checkpoint is {tag} in {where}" if tag else "no checkpoint was written yet"


def _stop_on_bad_steps(run: Run, streak: int) -> None:
    raise FloatingPointError(
        f"{streak} consecutive steps were skipped (non-finite loss or gradients"
        f"{', or fp16 overflow' if run.engine.fp16_enabled() else ''}), the last one aiming at step "
        f"{run.state.step + 1} (train.max_bad_steps={run.config.train.max_bad_steps}); {_last_good(run)}: lower "
        "train.lr (or check the data) and resume from it"
    )


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


def _save_rank_mask(out: Path, name: str, mask: torch.Tensor) -> None:
    """Each rank's own copy of a mask, so "the same mask on every rank" can be audited afterwards."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    save_file({"mask": mask.cpu().contiguous()}, out / "masks" / f"{name}.rank{ds_setup.rank()}.safetensors")


def _log_samples(out: Path, step: int, sample_ids: list[int], applied: bool) -> None:
    with open(out / samples_log(ds_setup.rank()), "a") as f:
        f.write(json.dumps({"step": step, "ids": sample_ids, "applied": applied}) + "\n")


def _params(config: PretrainConfig, ds: dict) -> dict:
    params = flatten(config.to_dict())
    params.update(flatten(ds, "deepspeed."))
    params.update(
        world_size=ds_setup.world_size(), git_commit=git_commit(), precision=ds_setup.precision(ds),
        search_steps=config.search_steps,
        device_type=ds_setup.device().type,
    )  # fmt: skip
    return params
