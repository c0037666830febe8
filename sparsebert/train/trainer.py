"""A pre-training run, read top to bottom: :func:`pretrain` = :func:`~sparsebert.train.setup.setup` (every rank
meets; data, model, engine, resume, tracking) → :func:`train` (stage 1, DAM patterns only: search the mask for
the search length → :func:`end_search` freezes it → stage 2: train with the fixed mask to ``train.max_steps``,
one :func:`train_step` at a time, checkpointing every ``checkpoint.every`` steps) → :func:`finish` (the last
checkpoint, the export to ``output_dir/final``, the summary). A restarted command resumes from the newest
checkpoint. An ``output_dir`` in object storage (``s3://``, ``gs://``) is worked on in a node-local staging
directory that :class:`~sparsebert.train.run_outputs.RunOutputs` keeps in step with the store. The command line is
``sparsebert/pretrain.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsebert import console
from sparsebert.data import model_inputs
from sparsebert.model.masks import sparsity
from sparsebert.track.mlflow_store import tracking_uri
from sparsebert.train import build, checkpoint, publish, run_report, sparsity_target, summary
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import DamConfig, PretrainConfig
from sparsebert.train.meter import Meter
from sparsebert.train.run_outputs import samples_log
from sparsebert.train.run_report import report
from sparsebert.train.setup import Run, TrainState, setup
from sparsebert.train.validation import evaluate

__all__ = [
    "Run",
    "TrainState",
    "end_search",
    "finish",
    "pretrain",
    "setup",
    "snapshot_importance",
    "train",
    "train_step",
    "validate",
]


def pretrain(config: PretrainConfig) -> int:
    """The whole run; 0 when it finished or stopped cleanly at a signal (checkpointed, resumable), 1 when it finished
    but the upload to the Hub that ``export.push_to_hub`` asked for failed."""
    run = setup(config)
    try:
        completed = train(run)
    except BaseException:
        run.tracker.end("FAILED")  # the MLflow run says so; a resume marks it running again
        run.outputs.close(together=False)
        raise
    published = finish(run) if completed else True
    if not completed:
        run.tracker.end("KILLED")  # stopped by a signal, checkpointed: the same command resumes it
    run.outputs.close()
    return 0 if published else 1


def train(run: Run) -> bool:
    """Train to ``train.max_steps``: the DAM search first (stage 1), then the fixed mask (stage 2). False when a
    stop signal ended it early (checkpointed: the same command resumes)."""
    config, state = run.config, run.state
    progress = console.progress(config.train.max_steps, state.step, enabled=run.rank0, desc="steps")
    if state.step == 0:
        validate(run)  # where the model starts, for the closing summary and the curves
        run.start_validation = dict(run.validation)
        snapshot_importance(run)
    meter = Meter()
    batches = iter(run.reader)
    bad_streak = 0
    while state.step < config.train.max_steps:
        if state.stage == 1 and state.step >= config.search_steps:
            end_search(run)
        if state.stage == 1:
            _anneal_temperature(run.model, config.dam, state.step, config.search_steps)
            sparsity_target.steer(run.model, run.target, state.dam_lambda, state.dam_gap, state.step)
        applied = train_step(run, batches, meter)
        if applied and state.stage == 1 and run.target is not None:  # λ follows the gap the step left
            density = run.model.expected_mask_density
            state.dam_lambda, state.dam_gap = run.target.after_step(state.dam_lambda, state.step - 1, density)
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
            snapshot_importance(run)  # dam.snapshot_every steps into a search
            if config.checkpoint.every and state.step % config.checkpoint.every == 0:
                _save(run)
                saved = True
            run.faults.after_step(state.step)  # tests only (SPARSEBERT_FAULTS): a killed or preempted rank
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


def snapshot_importance(run: Run) -> None:
    """Every ``dam.snapshot_every`` steps of a DAM search (step 0 included), σ(α) to the run's tracking records
    (on every rank: ZeRO-3 gathers α; rank 0 records it), for the importance-over-steps figures."""
    every, state = run.config.dam.snapshot_every, run.state
    if not every or state.stage != 1 or state.step % every:
        return
    with ds_setup.gathered(run.model.mask_source.parameters(), run.ds):
        importance = run.model.mask_importance(run.seq_len)
    run.tracker.log_importance(importance, state.step)


def train_step(run: Run, batches, meter: Meter) -> bool:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches; False when DeepSpeed skipped it.

    A skipped update (fp16 overflow, or a non-finite gradient) did not advance the LR schedule, and the step
    count, which drives the DAM schedule, checkpoints and logs, does not advance either; its batches are spent.
    The tests cause a skip through ``run.faults`` (a non-finite loss).
    """
    engine, state = run.engine, run.state
    sample_ids = []
    for _ in range(run.config.train.grad_accum_steps):
        batch = next(batches)
        outputs = engine(**model_inputs(batch, run.config.data.nsp))
        engine.backward(run.faults.loss(outputs.loss, state.step + 1))
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
    target, shift = config.dam.target_sparsity, {}
    with ds_setup.gathered(model.mask_source.parameters(), ds, modifier_rank=0):
        importance = model.mask_importance(run.seq_len)
        if target is not None:  # the frozen mask meets the target: α shifted by θ (sparsity_target)
            shift["sparsity_before_threshold"] = sparsity(model.current_mask(run.seq_len))
            shift["freeze_threshold"] = model.meet_mask_sparsity(target, run.seq_len)
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
    run.tracker.log_metrics({"frozen_sparsity": sparsity(mask), **shift}, step=config.search_steps)
    aimed = (
        f" (target {target:.1%}; 1[α > 0] had {shift['sparsity_before_threshold']:.1%}, α shifted by "
        f"{shift['freeze_threshold']:+.3g})"
        if shift
        else ""
    )
    report(f"\nDAM search done: mask frozen at sparsity {sparsity(mask):.1%}{aimed}")
    run_report.report_attention(run)


def finish(run: Run) -> bool:
    """The last checkpoint, the final mask, the export to ``output_dir/final`` (:mod:`sparsebert.train.publish`) and
    its upload to the Hub when asked; False when that upload failed (everything else is done)."""
    config, state, tracker = run.config, run.state, run.tracker
    if not (config.checkpoint.every and state.step % config.checkpoint.every == 0):
        _save(run)
    if not (config.eval.every and state.step % config.eval.every == 0):
        validate(run)  # the final model's held-out numbers, which final/ records
    final_mask = run.model.current_mask(run.seq_len)
    _save_rank_mask(run.out, "final", final_mask)
    importance = None
    if not run.model.mask_frozen:  # searched to the end (dam.freeze=false): log its importance too
        with ds_setup.gathered(run.model.mask_source.parameters(), run.ds):
            importance = run.model.mask_importance(run.seq_len)
    tracker.log_mask("final", final_mask, importance=importance)
    run.model.config.mlm_logits = "all"  # the exported model keeps transformers' output semantics
    final = publish.export_final(run)
    run.outputs.push_final(final)
    hub_error = publish.push_to_hub(run, final)
    tracker.set_tags({"final_model_dir": run.outputs.where("final"), "final_sparsity": sparsity(final_mask)})
    if hub_error:
        tracker.set_tags({"hub_push_error": hub_error[:4000]})
    tracker.end()
    _summarize(run, run.outputs.where("final"), sparsity(final_mask))
    return hub_error is None


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
        search_steps=run.state.search_steps or config.search_steps,  # the length the search really had
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


def _save_rank_mask(out: Path, name: str, mask: torch.Tensor) -> None:
    """Each rank's own copy of a mask, so "the same mask on every rank" can be audited afterwards."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    save_file({"mask": mask.cpu().contiguous()}, out / "masks" / f"{name}.rank{ds_setup.rank()}.safetensors")


def _log_samples(out: Path, step: int, sample_ids: list[int], applied: bool) -> None:
    with open(out / samples_log(ds_setup.rank()), "a") as f:
        f.write(json.dumps({"step": step, "ids": sample_ids, "applied": applied}) + "\n")
