"""Resumable DeepSpeed checkpoints (atomic ``latest``, keep the last K) and the final HF-format export."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from sparsebert import deepspeed_setup as ds_setup

LATEST = "latest"
TRAIN_STATE = "train_state.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(output_dir: str | Path) -> str | None:
    """The tag of the newest *complete* checkpoint, or None."""
    path = checkpoint_dir(output_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def save(engine, output_dir: str | Path, step: int, train_state: dict[str, Any], keep_last: int) -> str:
    """Every rank writes its part through DeepSpeed; ``latest`` moves only once all parts are on disk.

    A crash mid-save leaves a partial tag directory that ``latest`` never points to (it is cleaned up
    by the next save), so resuming always finds a whole checkpoint.
    """
    root = checkpoint_dir(output_dir)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(_rng_state(), root / tag / f"rng_rank{ds_setup.rank()}.pt")
    ds_setup.barrier()
    if ds_setup.rank() == 0:
        (root / tag / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)  # atomic on POSIX
        _prune(root, keep=keep_last, current=tag)
    ds_setup.barrier()
    return tag


def train_state(output_dir: str | Path, tag: str) -> dict[str, Any]:
    """The trainer's own state (step, stage, data position, ...) saved with checkpoint ``tag``."""
    path = checkpoint_dir(output_dir) / tag / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {tag!r} not found (no {path})")
    return json.loads(path.read_text())


def load(engine, output_dir: str | Path, tag: str) -> None:
    """Restore model, optimizer, scheduler (through DeepSpeed) and this rank's RNG."""
    root = checkpoint_dir(output_dir)
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{ds_setup.rank()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by a different world size"
        )
    _set_rng_state(torch.load(rng_file, weights_only=False))


def export_final(
    model, ds: dict[str, Any], out_dir: Path, tokenizer_dir: Path | None, mlflow_run_id: str | None = None
) -> None:
    """Write an HF-format model directory (safetensors + config with the mask + tokenizer), atomically.

    Under ZeRO-3 the parameters are gathered first; rank 0 writes. ``mlflow_run_id`` (a file) links the
    model to its pre-training run, wherever the directory is copied.
    """
    with ds_setup.gathered(model.parameters(), ds):
        if ds_setup.rank() == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if tokenizer_dir is not None:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
            if mlflow_run_id:
                (tmp / "mlflow_run_id").write_text(mlflow_run_id)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
    ds_setup.barrier()


def _prune(root: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [t for t in tags if t <= current]
    for tag in complete[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)
    for tag in tags:  # a tag newer than `latest` is the remains of a crashed save
        if tag > current:
            shutil.rmtree(root / tag, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    """Every random stream a rank draws from: Python, NumPy, torch's CPU generator and, on an accelerator, the
    generator of every device it sees (dropout and DAM's Gumbel noise draw from the device's generator)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = [accelerator.get_rng_state(i) for i in range(accelerator.device_count())]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    accelerator = get_accelerator()
    saved = state.get("accelerator", [])
    here = accelerator.device_count() if accelerator.device_name() != "cpu" else 0
    if len(saved) != here:
        raise RuntimeError(
            f"the checkpoint holds the RNG state of {len(saved)} {accelerator.device_name()} device(s), this "
            f"process sees {here}: resume on the same kind and number of devices for an exact replay"
        )
    for index, device_state in enumerate(saved):
        accelerator.set_rng_state(device_state, index)
