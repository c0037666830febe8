"""One fine-tuning job: load data and checkpoint, train with BERT's recipe, score on dev. Runs inside a Ray
worker, or in the driver's own process with ``--no-ray``.

Recipe (Devlin et al., 2019): AdamW (β=(0.9, 0.999), ε=1e-6, weight decay 0.01 except biases and LayerNorm),
linear warm-up over the first 10% of steps then linear decay to 0, gradient clipping at 1.0, dropout as
configured by the checkpoint. Inputs are padded to a fixed length, because the sparse mask is defined per
length (a pattern's sparsity at 128 is what the table reports).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from typing import Any

import numpy as np
import torch
import transformers

from eval.glue_data import load_glue
from eval.inputs import check_job_inputs
from eval.jobs import DEVICES, Job
from eval.model_loading import load_for_task
from eval.publish import save_model
from eval.squad_data import load_squad
from eval.squad_metrics import squad_v1_scores, squad_v2_scores
from eval.squad_postprocess import SquadFeatures, postprocess, prepare_features
from eval.tasks import PREDICTIONS_FILE, TASKS, TaskSpec
from sparsebert import console
from sparsebert.train.recipe import parameter_groups, seed_everything, warmup_decay_schedule


class InjectedFailure(RuntimeError):
    """Raised by a job the fault switch asks to fail (``SPARSEBERT_FAULTS=eval_fail=...``), to exercise
    retries and failure reports."""


def _glue_tensors(tokenizer, task: TaskSpec, examples, max_len: int) -> dict[str, torch.Tensor]:
    texts_b = [ex.text_b for ex in examples] if task.pair else None
    enc = tokenizer(
        [ex.text_a for ex in examples], texts_b, truncation=True, max_length=max_len,
        padding="max_length", return_tensors="pt",
    )  # fmt: skip
    dtype = torch.float32 if task.labels is None else torch.long
    return {**enc, "labels": torch.tensor([ex.label for ex in examples], dtype=dtype)}


def _squad_tensors(feats: SquadFeatures, train: bool) -> dict[str, torch.Tensor]:
    out = {k: torch.tensor(v) for k, v in feats.inputs.items()}
    if train:
        out["start_positions"] = torch.tensor(feats.start_positions)
        out["end_positions"] = torch.tensor(feats.end_positions)
    return out


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = parameter_groups(model.named_parameters(), weight_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)


def resolve_device(requested: str) -> torch.device:
    """The device a job runs on: ``"auto"`` takes the GPU when torch sees one; ``"cuda"`` insists on it.

    A job asked to use CUDA that cannot see a GPU raises instead of training on the CPU: on a GPU node that is
    a misconfiguration (wrong CUDA_VISIBLE_DEVICES, a CPU-only torch, a Ray task given no GPU), and a silent
    fallback would only show up as jobs a hundred times slower.
    """
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}: one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise RuntimeError(
            f"device 'cuda' was asked for but torch.cuda.is_available() is False in this process "
            f"(host {socket.gethostname()}, torch {torch.__version__} {build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}{_ray_gpu_note()})"
        )
    return torch.device("cuda")


def _ray_gpu_note() -> str:
    """The GPU ids Ray gave this worker, when we run under Ray (ray is never imported for this)."""
    if "ray" not in sys.modules:
        return ""
    import ray

    if not ray.is_initialized():
        return ""
    try:
        return f", Ray assigned GPU ids {ray.get_gpu_ids()}"
    except Exception as exc:  # only decorates an error message: never hide the real one
        return f", Ray GPU ids unknown ({type(exc).__name__})"


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def train(
    model, data: dict[str, torch.Tensor], job: Job, device: torch.device
) -> tuple[int, list[list[float]]]:
    """Fine-tune in place; returns the number of optimizer steps and the [step, mean loss] history."""
    cfg = job.config
    n = len(next(iter(data.values())))
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = int(cfg.warmup_ratio * total)
    opt = _optimizer(model, job.lr, cfg.weight_decay)
    sched = warmup_decay_schedule(opt, warmup, total, "linear")
    gen = torch.Generator().manual_seed(job.seed)
    log_every = max(1, total // 50)
    history: list[list[float]] = []
    running: list[float] = []
    model.train()
    step = 0
    while step < total:
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            batch = {k: v[idx].to(device) for k, v in data.items()}
            with _autocast(device, cfg.bf16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            running.append(loss.item())
            if not math.isfinite(running[-1]):
                raise FloatingPointError(f"{job.key}: loss became {running[-1]} at step {step}")
            if step % log_every == 0 or step == total:
                history.append([step, float(np.mean(running))])
                running = []
            if step >= total:
                break
    return step, history


@torch.no_grad()
def predict(model, data: dict[str, torch.Tensor], batch_size: int, device: torch.device, bf16: bool):
    """Concatenated model outputs (logits, or start/end logits) over ``data`` in order, as numpy."""
    model.eval()
    n = len(next(iter(data.values())))
    outs: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in data.items() if k != "labels"}
        with _autocast(device, bf16):
            out = model(**batch)
        fields = [out.logits] if hasattr(out, "logits") else [out.start_logits, out.end_logits]
        outs.append([f.float().cpu().numpy() for f in fields])
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def run_job(
    job: Job, attempt: int = 1, task: TaskSpec | None = None, fail_attempts: int = 0
) -> dict[str, Any]:
    """Fine-tune and evaluate one job; returns metrics, loss history, timing and (SQuAD) predictions.

    ``task`` defaults to the registry's entry for ``job.task``. ``fail_attempts`` comes from the ``eval_fail``
    fault, read by the driver: attempts up to this one raise :class:`InjectedFailure` once the data is loaded.
    """
    start_time = time.time()
    task = TASKS[job.task] if task is None else task
    cfg = job.config
    device = resolve_device(cfg.device)  # first, so a job that cannot get its GPU fails before loading data
    check_job_inputs(job, task)  # here, on the node the job runs on: the driver's view may not be the node's
    transformers.logging.set_verbosity_error()  # load reports list the fresh task head: expected noise here
    if not console.verbose():
        transformers.logging.disable_progress_bar()  # one "Loading weights" bar per job and worker otherwise
    tokenizer = transformers.AutoTokenizer.from_pretrained(job.checkpoint)
    train_ex, dev_ex = _examples(job, task)
    if attempt <= fail_attempts:
        raise InjectedFailure(f"{job.key}: failure injected for attempt {attempt} (fault eval_fail)")

    seed_everything(job.seed)
    model = load_for_task(
        job.checkpoint, task, cfg.attention_pattern, cfg.attention_backend, cfg.trust_remote_code
    ).to(device)
    finetune = _finetune_glue if task.kind == "glue" else _finetune_squad
    steps, history, metrics, predictions = finetune(model, tokenizer, task, train_ex, dev_ex, job, device)
    if job.save_to is not None:
        save_model(model, tokenizer, job, task, metrics)
    return {
        "job_key": job.key,
        "attempt": attempt,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "loss_history": history,
        "steps": steps,
        "train_examples": len(train_ex),
        "eval_examples": sum(len(v) for v in dev_ex.values()),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": socket.gethostname(),
        "start_time": start_time,
        "end_time": time.time(),
        "artifacts": predictions,
    }


def _examples(job: Job, task: TaskSpec) -> tuple[list, dict[str, list]]:
    """The task's training examples and its dev sets' (by metric suffix), capped for smoke runs."""
    src, cfg = job.data, job.config
    if task.kind == "glue":
        train = load_glue(task, "train", src.glue_dir, src.hub, cfg.max_train_samples)
        return train, {
            s: load_glue(task, s, src.glue_dir, src.hub, cfg.max_eval_samples) for s in task.dev_splits
        }
    train = load_squad(task, "train", src.squad_dir, src.hub, cfg.max_train_samples)
    return train, {"": load_squad(task, "", src.squad_dir, src.hub, cfg.max_eval_samples)}


# What fine-tuning one task gives: optimizer steps, the loss history, dev metrics, artifacts to record.
_Trained = tuple[int, list, dict[str, float], dict[str, Any]]


def _finetune_glue(
    model, tokenizer, task: TaskSpec, train_ex, dev_ex, job: Job, device: torch.device
) -> _Trained:
    """Train on a GLUE-format task, then score each dev set: steps, loss history, metrics, and the dev predictions
    (:data:`eval.tasks.PREDICTIONS_FILE`, from which :func:`eval.tasks.score_predictions` recomputes the metrics)."""
    cfg = job.config
    steps, history = train(model, _glue_tensors(tokenizer, task, train_ex, cfg.max_seq_len), job, device)
    metrics: dict[str, float] = {}
    saved: dict[str, dict[str, list]] = {}
    for split, examples in dev_ex.items():
        data = _glue_tensors(tokenizer, task, examples, cfg.max_seq_len)
        (logits,) = predict(model, data, cfg.eval_batch_size, device, cfg.bf16)
        preds = logits[:, 0] if task.labels is None else logits.argmax(-1)
        metrics.update(task.compute_metrics(preds, data["labels"].numpy(), suffix=split))
        saved[split] = {"predictions": preds.tolist(), "labels": data["labels"].tolist()}
    return steps, history, metrics, {PREDICTIONS_FILE: saved}


def _finetune_squad(
    model, tokenizer, task: TaskSpec, train_ex, dev_ex, job: Job, device: torch.device
) -> _Trained:
    """Train on a SQuAD task, then score dev with the official scorer of its version: steps, loss history,
    metrics, and the predictions (and v2.0 null odds) as artifacts."""
    cfg = job.config
    feat_args = (cfg.squad_max_seq_len, cfg.doc_stride, cfg.max_query_len)
    train_feats = prepare_features(tokenizer, train_ex, *feat_args, train=True)
    steps, history = train(model, _squad_tensors(train_feats, train=True), job, device)
    examples = dev_ex[""]
    feats = prepare_features(tokenizer, examples, *feat_args, train=False)
    start, end = predict(model, _squad_tensors(feats, train=False), cfg.eval_batch_size, device, cfg.bf16)
    preds, null_diff = postprocess(
        examples, feats, start, end, task.version_2, cfg.n_best, cfg.max_answer_len, cfg.null_threshold
    )
    gold = {ex.id: list(ex.answers) for ex in examples}
    metrics = squad_v2_scores(gold, preds, null_diff) if task.version_2 else squad_v1_scores(gold, preds)
    predictions = {PREDICTIONS_FILE: preds, **({"null_odds.json": null_diff} if task.version_2 else {})}
    return steps, history, metrics, predictions
