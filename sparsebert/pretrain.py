"""Pre-train SparseBERT under DeepSpeed: ``deepspeed [--hostfile cluster/hosts] sparsebert/pretrain.py``.

With no arguments it runs the embedded demo (a tiny model, a DAM_s search then a frozen stage, on the
Python documentation text, on CPU, in minutes). ``--config PRESET_OR_YAML`` picks a training config;
``dotted.key=value`` arguments override it; ``--help-config`` lists every key.

The run reads top to bottom: :func:`setup` (distributed init, data, model, engine, resume, tracking) →
:func:`train` ((stage 1, DAM patterns only) search the mask for ``dam.search_steps`` steps → :func:`end_search`
freezes it → (stage 2) train with the fixed mask to ``train.max_steps``, one :func:`train_step` at a time,
checkpointing every ``checkpoint.every`` steps) → :func:`finish` (the last checkpoint, the export to
``output_dir/final``). A restarted command resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (
    None,
    "",
):  # run as a script (the deepspeed launcher does this): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sparsebert import checkpoint, optim
from sparsebert import deepspeed_setup as ds_setup
from sparsebert.corpus import open_reader, prepare_default_corpus
from sparsebert.faults import step_fault
from sparsebert.masks import sparsity
from sparsebert.meter import Meter
from sparsebert.modeling import SparseBertConfig, SparseBertForPreTraining
from sparsebert.tracking import RunTracker, flatten, git_commit
from sparsebert.train_config import (
    DEFAULT_PRESET,
    MODEL_SIZES,
    DamConfig,
    PretrainConfig,
    describe,
    load_config,
    presets,
)
from sparsebert.training import seed_everything


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights, optimizer and RNG (``train_state.json``)."""

    step: int = 0
    stage: int = 1  # 1 = searching the mask, 2 = fixed/frozen mask
    reader: dict | None = None
    mlflow_run_id: str | None = None
    restarted: bool = False  # stage 2 started from fresh weights (dam.restart_weights)
    skipped_steps: int = 0  # optimizer steps DeepSpeed skipped (fp16 overflow, non-finite gradients)


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

    @property
    def seq_len(self) -> int:
        return self.reader.seq_len

    @property
    def rank0(self) -> bool:
        return ds_setup.rank() == 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    run = setup(load_config(args.config or DEFAULT_PRESET, args.overrides))
    train(run)
    finish(run)
    return 0


def setup(config: PretrainConfig) -> Run:
    """Join the process group, open this rank's data, build model and engine, resume from the newest checkpoint
    (if any), and start (or continue) the MLflow run."""
    ds_setup.init_distributed()
    rank0 = ds_setup.rank() == 0
    seed_everything(config.train.seed)
    ds = ds_setup.deepspeed_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(config.data.path) if config.data.path else prepare_default_corpus(rank0)
    reader = open_reader(data_dir, config)  # batches arrive on this rank's device

    resume_tag = _resume_tag(config, out)
    resumed = TrainState(**checkpoint.train_state(out, resume_tag)) if resume_tag else None
    restarted = resumed is not None and resumed.restarted
    tokenizer = reader.tokenizer
    model = build_model(config, len(tokenizer), tokenizer.pad_token_id, ds, frozen=restarted)
    engine, scheduler = build_engine(model, config, ds, restarted=restarted)
    engine.train()  # from_pretrained returns models in eval mode: no dropout, and a DAM mask would not search
    # Training randomness (dropout, Gumbel noise) starts from the seed whatever the ZeRO stage consumed
    # while building the model; ranks get distinct streams.
    seed_everything(config.train.seed + ds_setup.rank())
    state = resumed or TrainState(stage=2 if model.mask_frozen else 1)
    if resumed:
        checkpoint.load(engine, out, resume_tag)
        reader.load_state_dict(state.reader)
        if state.stage == 2 and not model.mask_frozen:  # the search ended before the checkpoint
            _freeze_in_place(model, engine, scheduler)

    tracker = RunTracker(enabled=rank0 and config.mlflow.enabled)
    tracker.start(
        config.mlflow.tracking_uri, config.mlflow.experiment, config.mlflow.run_name or out.name,
        state.mlflow_run_id, _params(config, ds),
    )  # fmt: skip
    state.mlflow_run_id = tracker.run_id
    if not resumed:
        tracker.log_configs(config.to_dict(), ds)
    _report(rank0, f"output: {out.resolve()}  |  data: {data_dir}  |  world size {ds_setup.world_size()}")
    _report(
        rank0,
        f"device: {ds_setup.device()}  |  ZeRO stage {ds_setup.zero_stage(ds)}  |  {ds_setup.precision(ds)}",
    )
    if resumed:
        _report(rank0, f"resumed from {resume_tag} at step {state.step} (stage {state.stage})")
    run = Run(config, ds, out, reader, model, engine, scheduler, tracker, state)
    report_attention(run)
    return run


def train(run: Run) -> None:
    """Train to ``train.max_steps``: the DAM search first (stage 1), then the fixed mask (stage 2)."""
    config, state = run.config, run.state
    progress = tqdm(
        total=config.train.max_steps, initial=state.step, disable=not run.rank0, dynamic_ncols=True
    )
    meter = Meter()
    batches = iter(run.reader)
    poison_step = step_fault("nonfinite_at_step") if run.rank0 else 0  # tests: the skipped-step path
    while state.step < config.train.max_steps:
        if state.stage == 1 and state.step >= config.dam.search_steps:
            end_search(run)
        if state.stage == 1:
            _anneal_temperature(run.model, config.dam, state.step)
        poison = poison_step == state.step + 1
        poison_step = 0 if poison else poison_step
        if not train_step(run, batches, meter, poison):
            continue
        progress.update(1)
        if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
            metrics = {**meter.flush(), **_state_metrics(run)}
            run.tracker.log_metrics(metrics, state.step)
            progress.set_postfix(
                stage=state.stage, loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
        if config.checkpoint.every and state.step % config.checkpoint.every == 0:
            _save(run)
        if run.rank0 and state.step == step_fault("crash_after_step"):  # tests: the resume path
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()


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
        outputs = engine(**_model_inputs(batch, run.config.data.nsp))
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
        model = build_model(config, model.config.vocab_size, model.config.pad_token_id, ds, frozen=True)
        with ds_setup.gathered(model.mask_source.parameters(), ds, modifier_rank=0), torch.no_grad():
            model.mask_source.load_state_dict(learned)
        run.engine, run.scheduler = build_engine(model, config, ds, restarted=True)
        run.engine.train()
        run.model = model
    else:
        _freeze_in_place(model, run.engine, run.scheduler)
    run.state.stage, run.state.restarted = 2, config.dam.restart_weights
    mask = model.current_mask(run.seq_len)
    _save_rank_mask(run.out, "stage1_frozen", mask)
    if not ds_setup.same_on_all_ranks(mask):
        raise RuntimeError("the frozen DAM mask differs between ranks; refusing to continue")
    run.tracker.log_mask("stage1_frozen", mask, importance=importance)
    run.tracker.log_metrics({"frozen_sparsity": sparsity(mask)}, step=config.dam.search_steps)
    _report(run.rank0, f"\nDAM search done: mask frozen at sparsity {sparsity(mask):.1%}")
    report_attention(run)


def finish(run: Run) -> None:
    """The last checkpoint, the final mask, and the HF-format export to ``output_dir/final``."""
    config, state, tracker = run.config, run.state, run.tracker
    if not (config.checkpoint.every and state.step % config.checkpoint.every == 0):
        _save(run)
    final_mask = run.model.current_mask(run.seq_len)
    _save_rank_mask(run.out, "final", final_mask)
    tracker.log_mask("final", final_mask)
    run.model.config.mlm_logits = "all"  # the exported model keeps transformers' output semantics
    final = run.out / "final"
    checkpoint.export_final(run.model, run.ds, final, run.reader.tokenizer_dir, tracker.run_id)
    tracker.set_tags({"final_model_dir": str(final.resolve()), "final_sparsity": sparsity(final_mask)})
    tracker.end()
    _report(run.rank0, f"done: model in {final.resolve()}")
    if tracker.run_id:
        _report(
            run.rank0,
            f"MLflow run {tracker.run_id} (experiment {config.mlflow.experiment!r}); view it with `mlflow ui`",
        )


# --- building blocks ---------------------------------------------------------------------------------------


def build_model(
    config: PretrainConfig, vocab_size: int, pad_token_id: int, ds: dict, frozen: bool = False
) -> SparseBertForPreTraining:
    """The model of ``config.model`` (random init, or continued from ``model.init_from``)."""
    m = config.model
    pattern = m.mask_spec.to_config()
    if frozen:
        pattern["frozen"] = True
    layers, hidden, heads = MODEL_SIZES[m.size]
    hidden = m.hidden_size or hidden
    arch = dict(
        num_hidden_layers=m.num_layers or layers,
        hidden_size=hidden,
        num_attention_heads=m.num_heads or heads,
        intermediate_size=m.intermediate_size or 4 * hidden,
        max_position_embeddings=m.max_position_embeddings,
        hidden_dropout_prob=m.hidden_dropout,
        attention_probs_dropout_prob=m.attention_dropout,
    )
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank and in every stage
    ds_setup.enable_zero3_init(ds)
    if m.init_from:
        return SparseBertForPreTraining.from_pretrained(
            m.init_from,
            attention_pattern=pattern,
            attention_backend=m.attention_backend,
            mlm_logits=m.mlm_logits,
        )
    model_config = SparseBertConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        attention_pattern=pattern,
        attention_backend=m.attention_backend,
        mlm_logits=m.mlm_logits,
        **arch,
    )
    return SparseBertForPreTraining._from_config(model_config)


def build_engine(model, config: PretrainConfig, ds: dict, restarted: bool = False):
    """DeepSpeed engine + schedule. After a weight restart, the schedule spans stage 2 only."""
    optimizer = optim.build_optimizer(model, config.train)
    offset = config.dam.search_steps if restarted else 0
    total = config.train.max_steps - offset

    return ds_setup.initialize(
        model, optimizer, lambda opt: optim.build_scheduler(opt, config.train, total), ds
    )


def _freeze_in_place(model, engine, scheduler) -> None:
    model.freeze_mask()
    optim.stop_dam_updates(engine.optimizer, scheduler)


def _anneal_temperature(model, dam: DamConfig, step: int) -> None:
    """Exponential τ annealing from dam.tau_start to dam.tau_end over the search."""
    if dam.tau_start is not None:
        progress = step / max(1, dam.search_steps - 1)
        model.mask_temperature = dam.tau_start * (dam.tau_end / dam.tau_start) ** min(progress, 1.0)


def _save(run: Run) -> None:
    state = replace(run.state, reader=run.reader.state_dict())
    checkpoint.save(run.engine, run.out, state.step, vars(state), run.config.checkpoint.keep_last)


def _state_metrics(run: Run) -> dict[str, float]:
    """What the log reports besides the meter: schedule, DAM state, skipped steps and the fp16 loss scale."""
    metrics = {
        "lr": run.scheduler.get_last_lr()[0],
        "stage": float(run.state.stage),
        "mask_density": float(run.model.current_mask(run.seq_len).float().mean()),
        "skipped_steps": float(run.state.skipped_steps),
    }
    if (tau := run.model.mask_temperature) is not None:
        metrics["tau"] = tau
    if (scale := ds_setup.loss_scale(run.engine)) is not None:
        metrics["loss_scale"] = scale
    return metrics


def report_attention(run: Run) -> None:
    """Print and log the attention backend a training pass of this stage runs and the dropout it applies."""
    model, stage = run.model, run.state.stage
    backend, dropout = model.attention_in_force(run.seq_len, training=True)
    configured = model.config.attention_probs_dropout_prob
    note = (
        f" (model.attention_dropout={configured:g}: {backend} applies none)" if dropout != configured else ""
    )
    _report(
        ds_setup.rank() == 0,
        f"stage {stage}: attention backend {backend} (model.attention_backend="
        f"{model.config.attention_backend}), attention dropout {dropout:g}{note}",
    )
    run.tracker.log_params(
        {f"attention.stage{stage}.backend": backend, f"attention.stage{stage}.dropout": dropout}
    )


def _model_inputs(batch: dict, nsp: bool) -> dict:
    keys = ["input_ids", "token_type_ids", "attention_mask", "labels"] + (
        ["next_sentence_label"] if nsp else []
    )
    return {k: batch[k] for k in keys}


def _save_rank_mask(out: Path, name: str, mask: torch.Tensor) -> None:
    """Each rank's own copy of a mask, so "the same mask on every rank" can be audited afterwards."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    save_file({"mask": mask.cpu().contiguous()}, out / "masks" / f"{name}.rank{ds_setup.rank()}.safetensors")


def _log_samples(out: Path, step: int, sample_ids: list[int], applied: bool) -> None:
    with open(out / f"samples.rank{ds_setup.rank()}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "ids": sample_ids, "applied": applied}) + "\n")


def _resume_tag(config: PretrainConfig, out: Path) -> str | None:
    mode = config.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpoint.latest_tag(out)
    return mode  # an explicit tag


def _params(config: PretrainConfig, ds: dict) -> dict:
    params = flatten(config.to_dict())
    params.update(flatten(ds, "deepspeed."))
    params.update(
        world_size=ds_setup.world_size(), git_commit=git_commit(), precision=ds_setup.precision(ds),
        device_type=ds_setup.device().type,
    )  # fmt: skip
    return params


def _report(rank0: bool, message: str) -> None:
    if rank0:
        print(message, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"presets: {', '.join(presets())}. Example: model.attention_pattern=star train.max_steps=200",
    )
    parser.add_argument("--config", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
