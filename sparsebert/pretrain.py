"""Pre-train SparseBERT under DeepSpeed: ``deepspeed [--hostfile cluster/hosts] sparsebert/pretrain.py``.

With no arguments it runs the embedded demo (a tiny model, a DAM_s search then a frozen stage, on the
Python documentation text, on CPU, in minutes). ``--config PRESET_OR_YAML`` picks a training config;
``dotted.key=value`` arguments override it; ``--help-config`` lists every key.

The loop: (stage 1, DAM patterns only) search the mask for ``dam.search_steps`` steps → freeze it →
(stage 2) train with the frozen mask to ``train.max_steps``. Checkpoints every ``checkpoint.every`` steps;
a restarted command resumes from the newest one. At the end the model is exported to ``output_dir/final``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

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
from sparsebert.dam import DamMask
from sparsebert.faults import step_fault
from sparsebert.masks import parse_spec, sparsity
from sparsebert.modeling import SparseBertConfig, SparseBertForPreTraining
from sparsebert.tracking import RunTracker, flatten, git_commit
from sparsebert.train_config import (
    DEFAULT_PRESET,
    MODEL_SIZES,
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


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    config = load_config(args.config or DEFAULT_PRESET, args.overrides)
    ds_setup.init_distributed()
    rank0 = ds_setup.rank() == 0
    seed_everything(config.train.seed)
    ds = ds_setup.deepspeed_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    device = ds_setup.device()
    data_dir = Path(config.data.path) if config.data.path else prepare_default_corpus(rank0)
    reader = open_reader(data_dir, config)  # batches arrive on this rank's device
    seq_len = reader.manifest["seq_len"]
    spec = parse_spec(config.model.attention_pattern)
    searches = spec.learned and not spec.params["frozen"]

    state = TrainState(stage=1 if searches else 2)
    resume_tag = _resume_tag(config, out)
    if resume_tag:
        state = TrainState(**checkpoint.train_state(out, resume_tag))
    model = build_model(config, reader.tokenizer, ds, frozen=state.restarted)
    engine, scheduler = build_engine(model, config, ds, restarted=state.restarted)
    engine.train()  # from_pretrained returns models in eval mode: no dropout, and a DAM mask would not search
    # Training randomness (dropout, Gumbel noise) starts from the seed whatever the ZeRO stage consumed
    # while building the model; ranks get distinct streams.
    seed_everything(config.train.seed + ds_setup.rank())
    if resume_tag:
        checkpoint.load(engine, out, resume_tag)
        reader.load_state_dict(state.reader)
        if state.stage == 2 and searches and not state.restarted:
            _freeze_in_place(model, engine, scheduler)

    tracker = RunTracker(enabled=rank0 and config.mlflow.enabled)
    tracker.start(
        config.mlflow.tracking_uri, config.mlflow.experiment, config.mlflow.run_name or out.name,
        state.mlflow_run_id, _params(config, ds),
    )  # fmt: skip
    state.mlflow_run_id = tracker.run_id
    if not resume_tag:
        tracker.log_configs(config.to_dict(), ds)
    _report(rank0, f"output: {out.resolve()}  |  data: {data_dir}  |  world size {ds_setup.world_size()}")
    _report(rank0, f"device: {device}  |  ZeRO stage {ds_setup.zero_stage(ds)}  |  {ds_setup.precision(ds)}")
    if resume_tag:
        _report(rank0, f"resumed from {resume_tag} at step {state.step} (stage {state.stage})")
    report_attention(model, seq_len, state.stage, tracker)

    progress = tqdm(total=config.train.max_steps, initial=state.step, disable=not rank0, dynamic_ncols=True)
    meter = Meter()
    batches = iter(reader)
    poison_step = step_fault("nonfinite_at_step") if rank0 else 0  # tests: the skipped-step path
    while state.step < config.train.max_steps:
        if state.stage == 1 and state.step >= config.dam.search_steps:
            model, engine, scheduler = end_search(model, engine, scheduler, config, ds, tracker, seq_len)
            state.stage, state.restarted = 2, config.dam.restart_weights
            report_attention(model, seq_len, state.stage, tracker)
        if state.stage == 1:
            _anneal_tau(model, config, state.step)

        sample_ids = []
        for _ in range(config.train.grad_accum_steps):
            batch = next(batches)
            outputs = engine(**_model_inputs(batch, config.data.nsp))
            loss = outputs.loss
            if poison_step == state.step + 1:
                loss, poison_step = loss * float("inf"), 0
            engine.backward(loss)
            engine.step()
            meter.add(outputs, batch)
            sample_ids += batch["sample_index"].tolist()
        applied = engine.was_step_applied()
        if config.data.log_sample_ids:
            _log_samples(out, state.step + 1, sample_ids, applied)
        meter.end_step(applied)
        if not applied:
            # DeepSpeed skipped the update (fp16 overflow, or a non-finite gradient) and did not advance the LR
            # schedule; the step count, which drives the DAM schedule, checkpoints and logs, does not advance
            # either. The skipped step's batches are spent.
            state.skipped_steps += 1
            continue
        state.step += 1
        progress.update(1)

        if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
            metrics = meter.flush()
            metrics.update(_state_metrics(model, engine, scheduler, state, seq_len))
            tracker.log_metrics(metrics, state.step)
            progress.set_postfix(
                stage=state.stage, loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
        if config.checkpoint.every and state.step % config.checkpoint.every == 0:
            _save(engine, out, state, reader, config)
        if rank0 and state.step == step_fault("crash_after_step"):  # tests: the resume path
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()

    if not (config.checkpoint.every and state.step % config.checkpoint.every == 0):
        _save(engine, out, state, reader, config)
    final_mask = model.current_mask(seq_len)
    _save_rank_mask(out, "final", final_mask)
    tracker.log_mask("final", final_mask)
    model.config.mlm_logits = "all"  # the exported model keeps transformers' output semantics
    checkpoint.export_final(model, ds, out / "final", reader.tokenizer_dir, tracker.run_id)
    tracker.set_tags(
        {"final_model_dir": str((out / "final").resolve()), "final_sparsity": sparsity(final_mask)}
    )
    tracker.end()
    _report(rank0, f"done: model in {(out / 'final').resolve()}")
    if tracker.run_id:
        _report(
            rank0,
            f"MLflow run {tracker.run_id} (experiment {config.mlflow.experiment!r}); view it with `mlflow ui`",
        )
    return 0


# --- building blocks ---------------------------------------------------------------------------------------


def build_model(
    config: PretrainConfig, tokenizer, ds: dict, frozen: bool = False
) -> SparseBertForPreTraining:
    """The model of ``config.model`` (random init, or continued from ``model.init_from``)."""
    m = config.model
    pattern = parse_spec(m.attention_pattern).to_config()
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
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
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


def end_search(model, engine, scheduler, config: PretrainConfig, ds: dict, tracker: RunTracker, seq_len: int):
    """Stage 1 → 2: freeze the mask (checked identical on every rank), log it, continue or restart weights."""
    source = model.mask_source
    with ds_setup.gathered([source.alpha], ds):
        importance = torch.sigmoid(source.alpha.detach().float()).clone()
        alpha = source.alpha.detach().clone()
    if config.dam.restart_weights:
        engine.destroy()
        model = build_model(config, _TokenizerShape(model.config), ds, frozen=True)
        with ds_setup.gathered([model.mask_source.alpha], ds, modifier_rank=0), torch.no_grad():
            model.mask_source.alpha.copy_(alpha)
        engine, scheduler = build_engine(model, config, ds, restarted=True)
        engine.train()
    else:
        _freeze_in_place(model, engine, scheduler)
    mask = model.current_mask(seq_len)
    _save_rank_mask(Path(config.output_dir), "stage1_frozen", mask)
    if not ds_setup.same_on_all_ranks(mask):
        raise RuntimeError("the frozen DAM mask differs between ranks; refusing to continue")
    full = _per_layer_importance(importance, source.name, seq_len, model.config.num_hidden_layers)
    tracker.log_mask("stage1_frozen", mask, importance=full)
    tracker.log_metrics({"frozen_sparsity": sparsity(mask)}, step=config.dam.search_steps)
    _report(ds_setup.rank() == 0, f"\nDAM search done: mask frozen at sparsity {sparsity(mask):.1%}")
    return model, engine, scheduler


def _freeze_in_place(model, engine, scheduler) -> None:
    model.freeze_mask()
    optim.stop_dam_updates(engine.optimizer, scheduler)


class Meter:
    """Training numbers between two logs, accumulated on the device the model computes them on: the host waits
    for the device once per log, not per micro-batch. Micro-batches of a step DeepSpeed skipped are dropped."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # over the micro-batches of applied steps
        self.pending: dict[str, torch.Tensor] = {}  # the current step's micro-batches
        self.count = self.pending_count = 0
        self.samples = self.pending_samples = 0
        self.start = time.perf_counter()

    def add(self, outputs, batch) -> None:
        """One micro-batch (no host synchronisation)."""
        labels = batch["labels"]
        selected = labels != -100
        guesses = outputs.prediction_logits.detach().argmax(-1)
        if guesses.dim() == 1:  # logits at the masked positions only (model.mlm_logits=masked_only)
            guesses = torch.full_like(labels, -1).masked_scatter_(selected, guesses)
        hits = ((guesses == labels) & selected).sum()
        values = {
            "loss": outputs.loss,
            "mlm_loss": outputs.mlm_loss,
            "mlm_accuracy": hits / selected.sum().clamp_min(1),
            "tokens": batch["attention_mask"].sum(),
        }
        if outputs.nsp_loss is not None:
            values["nsp_loss"] = outputs.nsp_loss
            nsp_hits = outputs.seq_relationship_logits.detach().argmax(-1) == batch["next_sentence_label"]
            values["nsp_accuracy"] = nsp_hits.float().mean()
        if outputs.mask_penalty is not None:
            values["mask_penalty"] = outputs.mask_penalty
        for key, value in values.items():
            value = value.detach().float()
            self.pending[key] = self.pending[key] + value if key in self.pending else value
        self.pending_count += 1
        self.pending_samples += batch["input_ids"].shape[0]

    def end_step(self, applied: bool) -> None:
        """Keep the step's micro-batches if DeepSpeed applied the step, else drop them."""
        if applied:
            for key, value in self.pending.items():
                self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.count += self.pending_count
            self.samples += self.pending_samples
        self.pending, self.pending_count, self.pending_samples = {}, 0, 0

    def reduced(self) -> dict[str, torch.Tensor]:
        """Per-micro-batch means, averaged over ranks in one collective; still on the device."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        return dict(zip(keys, ds_setup.all_mean(stacked).unbind(), strict=True))

    def flush(self) -> dict[str, float]:
        """The interval's metrics as numbers (one device → host copy), and a fresh interval."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        reduced = self.reduced()
        values = torch.stack(list(reduced.values())).tolist() if reduced else []
        metrics = dict(zip(reduced, values, strict=True))
        world = ds_setup.world_size()
        tokens = metrics.pop("tokens", 0.0) * self.count  # this rank's mean → all ranks' total / world
        metrics["tokens_per_s"] = tokens * world / elapsed
        metrics["samples_per_s"] = self.samples * world / elapsed
        self._reset()
        return metrics


def _state_metrics(model, engine, scheduler, state: TrainState, seq_len: int) -> dict[str, float]:
    """What the log reports besides the meter: schedule, DAM state, skipped steps and the fp16 loss scale."""
    metrics = {
        "lr": scheduler.get_last_lr()[0],
        "stage": float(state.stage),
        "mask_density": float(model.current_mask(seq_len).float().mean()),
        "skipped_steps": float(state.skipped_steps),
    }
    source = model.mask_source
    if isinstance(source, DamMask):
        metrics["tau"] = source.tau
    if (scale := ds_setup.loss_scale(engine)) is not None:
        metrics["loss_scale"] = scale
    return metrics


def report_attention(model, seq_len: int, stage: int, tracker: RunTracker) -> None:
    """Print and log the attention backend a training pass of this stage runs and the dropout it applies."""
    backend, dropout = model.attention_in_force(seq_len, training=True)
    configured = model.config.attention_probs_dropout_prob
    note = (
        f" (model.attention_dropout={configured:g}: {backend} applies none)" if dropout != configured else ""
    )
    _report(
        ds_setup.rank() == 0,
        f"stage {stage}: attention backend {backend} (model.attention_backend="
        f"{model.config.attention_backend}), attention dropout {dropout:g}{note}",
    )
    tracker.log_params(
        {f"attention.stage{stage}.backend": backend, f"attention.stage{stage}.dropout": dropout}
    )


def _model_inputs(batch: dict, nsp: bool) -> dict:
    keys = ["input_ids", "token_type_ids", "attention_mask", "labels"] + (
        ["next_sentence_label"] if nsp else []
    )
    return {k: batch[k] for k in keys}


def _anneal_tau(model, config: PretrainConfig, step: int) -> None:
    """Exponential τ annealing from dam.tau_start to dam.tau_end over the search."""
    d = config.dam
    if d.tau_start is not None:
        progress = step / max(1, d.search_steps - 1)
        model.mask_source.tau = d.tau_start * (d.tau_end / d.tau_start) ** min(progress, 1.0)


def _per_layer_importance(importance: torch.Tensor, name: str, seq_len: int, layers: int) -> torch.Tensor:
    from sparsebert.masks import expand_alpha

    return expand_alpha(name, importance, seq_len).expand(layers, -1, -1, -1)


class _TokenizerShape:
    """What build_model needs of a tokenizer, from an existing model config (for a weight restart)."""

    def __init__(self, model_config):
        self.pad_token_id = model_config.pad_token_id
        self._size = model_config.vocab_size

    def __len__(self) -> int:
        return self._size


def _save(engine, out: Path, state: TrainState, reader, config: PretrainConfig) -> None:
    state = replace(state, reader=reader.state_dict())
    checkpoint.save(engine, out, state.step, vars(state), config.checkpoint.keep_last)


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
