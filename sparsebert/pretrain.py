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
import random
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

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sparsebert import checkpoint, optim
from sparsebert import deepspeed_setup as ds_setup
from sparsebert.corpus import open_reader, prepare_default_corpus
from sparsebert.dam import DamMask
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

CRASH_AFTER_STEP = "SPARSEBERT_CRASH_AFTER_STEP"  # test hook: SIGKILL rank 0 after this step


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights, optimizer and RNG (``train_state.json``)."""

    step: int = 0
    stage: int = 1  # 1 = searching the mask, 2 = fixed/frozen mask
    reader: dict | None = None
    mlflow_run_id: str | None = None
    restarted: bool = False  # stage 2 started from fresh weights (dam.restart_weights)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    config = load_config(args.config or DEFAULT_PRESET, args.overrides)
    ds_setup.init_distributed()
    rank0 = ds_setup.rank() == 0
    _seed_everything(config.train.seed)
    ds = ds_setup.deepspeed_config(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    data_dir = Path(config.data.path) if config.data.path else prepare_default_corpus(rank0)
    reader = open_reader(data_dir, config)
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
    _seed_everything(config.train.seed + ds_setup.rank())
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
    if resume_tag:
        _report(rank0, f"resumed from {resume_tag} at step {state.step} (stage {state.stage})")

    progress = tqdm(total=config.train.max_steps, initial=state.step, disable=not rank0, dynamic_ncols=True)
    meter = Meter()
    batches = iter(reader)
    while state.step < config.train.max_steps:
        if state.stage == 1 and state.step >= config.dam.search_steps:
            model, engine, scheduler = end_search(model, engine, scheduler, config, ds, tracker, seq_len)
            state.stage, state.restarted = 2, config.dam.restart_weights
        if state.stage == 1:
            _anneal_tau(model, config, state.step)

        sample_ids = []
        for _ in range(config.train.grad_accum_steps):
            batch = next(batches)
            outputs = engine(**_model_inputs(batch, config.data.nsp))
            engine.backward(outputs.loss)
            engine.step()
            meter.add(outputs, batch)
            sample_ids += batch["sample_index"].tolist()
        state.step += 1
        if config.data.log_sample_ids:
            _log_samples(out, state.step, sample_ids)
        progress.update(1)

        if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
            metrics = meter.flush(model, seq_len, scheduler, state.stage)
            tracker.log_metrics(metrics, state.step)
            progress.set_postfix(
                stage=state.stage, loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
        if config.checkpoint.every and state.step % config.checkpoint.every == 0:
            _save(engine, out, state, reader, config)
        if os.environ.get(CRASH_AFTER_STEP) == str(state.step) and rank0:
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

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: optim.lr_factor(step, config.train, total))

    return ds_setup.initialize(model, optimizer, schedule, ds)


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
    """Accumulates per-step numbers between logs; rank-averaged when flushed."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, outputs, batch) -> None:
        self.count += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += batch["input_ids"].shape[0]
        values = {"loss": outputs.loss, "mlm_loss": outputs.mlm_loss}
        labels = batch["labels"]
        predicted = labels[labels != -100]
        guesses = outputs.prediction_logits.argmax(-1)
        if guesses.dim() == 2:  # logits for every position (model.mlm_logits=all)
            guesses = guesses[labels != -100]
        hits = (guesses == predicted).float()
        values["mlm_accuracy"] = hits.mean() if hits.numel() else torch.tensor(0.0)
        if outputs.nsp_loss is not None:
            values["nsp_loss"] = outputs.nsp_loss
            nsp_hits = outputs.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]
            values["nsp_accuracy"] = nsp_hits.float().mean()
        if outputs.mask_penalty is not None:
            values["mask_penalty"] = outputs.mask_penalty
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())

    def flush(self, model, seq_len: int, scheduler, stage: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        metrics = ds_setup.all_mean(metrics)
        world = ds_setup.world_size()
        metrics["tokens_per_s"] = self.tokens * world / elapsed
        metrics["samples_per_s"] = self.samples * world / elapsed
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["stage"] = float(stage)
        metrics["mask_density"] = float(model.current_mask(seq_len).float().mean())
        source = model.mask_source
        if isinstance(source, DamMask):
            metrics["tau"] = source.tau
        self.__init__()
        return metrics


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
    from sparsebert.dam import expand_alpha

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
    save_file({"mask": mask.contiguous()}, out / "masks" / f"{name}.rank{ds_setup.rank()}.safetensors")


def _log_samples(out: Path, step: int, sample_ids: list[int]) -> None:
    with open(out / f"samples.rank{ds_setup.rank()}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "ids": sample_ids}) + "\n")


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
    params.update(world_size=ds_setup.world_size(), git_commit=git_commit())
    return params


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
