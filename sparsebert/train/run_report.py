"""What a pre-training run reports besides the meter's numbers: schedule and optimizer state, MFU, and the
attention a training step runs with. ``run`` is a :class:`sparsebert.pretrain.Run`."""

from __future__ import annotations

from deepspeed.accelerator import get_accelerator

from sparsebert.train import distributed as ds_setup
from sparsebert.train import flops, sparsity_target


def report(message: str) -> None:
    """Print on rank 0 only."""
    if ds_setup.rank() == 0:
        print(message, flush=True)


def state_metrics(run) -> dict[str, float]:
    """What the log reports besides the meter: schedule, gradient norm, DAM state, skipped steps, the fp16 loss
    scale and the device's peak memory."""
    metrics = {
        "lr": run.scheduler.get_last_lr()[0],
        "stage": float(run.state.stage),
        "mask_density": float(run.model.current_mask(run.seq_len).float().mean()),
        "skipped_steps": float(run.state.skipped_steps),
    }
    if (norm := run.engine.get_global_grad_norm()) is not None:
        metrics["grad_norm"] = float(norm)  # of the last step, before clipping
    if ds_setup.device().type != "cpu":  # CPU ranks have no allocator statistics
        metrics["peak_memory_gib"] = get_accelerator().max_memory_allocated() / 2**30
    if (tau := run.model.mask_temperature) is not None:
        metrics["tau"] = tau
    if run.state.stage == 1:  # λ's trajectory under dam.target_sparsity, with the expected sparsity and goal
        metrics.update(
            sparsity_target.metrics(
                run.model, run.target, run.state.dam_lambda, run.state.dam_gap, run.state.step
            )
        )
    if (scale := ds_setup.loss_scale(run.engine)) is not None:
        metrics["loss_scale"] = scale
    return metrics


def with_mfu(run, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus MFU: model FLOPs per second (sparsebert.train.flops) over every rank's peak FLOP/s (the
    device's, or ``train.peak_tflops``); none where the peak is unknown (CPU, an unlisted GPU)."""
    peak = flops.peak_flops(ds_setup.device(), run.config.train.peak_tflops)
    if peak:
        masked = metrics["masked_tokens_per_s"] if run.model.config.mlm_logits == "masked_only" else None
        per_s = flops.model_flops(run.model, metrics["samples_per_s"] * run.seq_len, run.seq_len, masked)
        metrics["mfu"] = per_s / (peak * ds_setup.world_size())
    return metrics


def report_attention(run) -> None:
    """Print and log the attention backend a training pass of this stage runs and the dropout it applies."""
    model, stage = run.model, run.state.stage
    backend, dropout = model.attention_in_force(run.seq_len, training=True)
    configured = model.config.attention_probs_dropout_prob
    note = (
        f" (model.attention_dropout={configured:g}: {backend} applies none)" if dropout != configured else ""
    )
    report(
        f"stage {stage}: attention backend {backend} (model.attention_backend="
        f"{model.config.attention_backend}), attention dropout {dropout:g}{note}",
    )
    run.tracker.log_params(
        {f"attention.stage{stage}.backend": backend, f"attention.stage{stage}.dropout": dropout}
    )
