"""Resumable DeepSpeed checkpoints and the final HF-format export, made safe for long runs.

* ``latest`` moves (atomically) only once every rank has written its part, so resuming finds whole checkpoints.
* A checkpoint records the training config; resuming with different values in keys that change the run is an
  error naming them (``checkpoint.allow_config_change`` overrides).
* Pruning deletes only checkpoints older than the one just written; checkpoints newer than a resumed tag stay
  unless ``checkpoint.discard_newer`` says otherwise; only a crashed save's incomplete remains are cleaned up.
* One run at a time per ``output_dir`` (:func:`lock_output_dir`); ``final/`` is swapped into place atomically.
* RNG states are stored as plain tensors and numbers, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import ConfigError, PretrainConfig, run_changes

LATEST = "latest"
TRAIN_STATE = "train_state.json"  # written last, by rank 0, once every rank's part is on disk: a complete tag
TRAIN_CONFIG = "train_config.json"
LOCK = ".lock"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(output_dir: str | Path) -> str | None:
    """The tag of the newest *complete* checkpoint, or None."""
    path = checkpoint_dir(output_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def save(
    engine,
    output_dir: str | Path,
    step: int,
    train_state: dict[str, Any],
    keep_last: int,
    train_config: dict[str, Any] | None = None,
) -> str:
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
        if train_config is not None:
            (root / tag / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=1))
        (root / tag / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)  # atomic on POSIX
        _prune(root, keep=keep_last, current=tag)
    ds_setup.barrier()
    return tag


def saved_config(output_dir: str | Path, tag: str) -> dict[str, Any] | None:
    """The training config a checkpoint was written with (None for checkpoints from before it was recorded)."""
    path = checkpoint_dir(output_dir) / tag / TRAIN_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def newer_tags(output_dir: str | Path, tag: str) -> list[str]:
    """Complete checkpoints newer than ``tag`` (a rollback to ``tag`` would overwrite them)."""
    root = checkpoint_dir(output_dir)
    return [t for t in _complete_tags(root) if t > tag] if root.is_dir() else []


def discard_newer(output_dir: str | Path, newer: list[str]) -> list[str]:
    """Delete the checkpoints ``newer`` (rank 0 found them newer than the one resumed; asked for with
    ``checkpoint.discard_newer``): rank 0 deletes, every rank waits; returns their tags."""
    if ds_setup.rank() == 0:
        for name in newer:
            shutil.rmtree(checkpoint_dir(output_dir) / name)
    ds_setup.barrier()
    return newer


def resume_point(output_dir: str | Path, resume: str) -> dict[str, Any]:
    """Where a run resumes, as ``output_dir`` holds it: the tag (``checkpoint.resume``: ``auto`` = the newest
    complete checkpoint, ``never``, or a tag), its train state and saved config, and the complete checkpoints
    newer than it. The one place a run's decisions are read from ``output_dir``: the trainer reads it on rank 0
    and hands rank 0's answer to every rank (``agreement.decide``), so no two ranks resume differently."""
    tag = None if resume == "never" else latest_tag(output_dir) if resume == "auto" else resume
    if tag is None:
        return {"tag": None}
    return {
        "tag": tag,
        "train_state": train_state(output_dir, tag),
        "saved_config": saved_config(output_dir, tag),
        "newer": newer_tags(output_dir, tag),
    }


def check_resume(output_dir: str | Path, point: dict[str, Any], config: PretrainConfig) -> list[str]:
    """Refuse to resume ``point`` (:func:`resume_point`) with a config that changes the run, or over newer
    checkpoints (unless the config's ``checkpoint.allow_config_change`` / ``checkpoint.discard_newer`` say so; the
    latter deletes them: their tags are returned)."""
    tag, saved, newer = point["tag"], point["saved_config"], point["newer"]
    if saved is not None and not config.checkpoint.allow_config_change:
        changed = run_changes(saved, config)
        if changed:
            raise ConfigError(
                f"checkpoint {tag} in {output_dir} was written with other values of {', '.join(changed)}; "
                "resuming would mix two runs. Use another output_dir, restore those values, or set "
                "checkpoint.allow_config_change=true to resume anyway"
            )
    if newer and not config.checkpoint.discard_newer:
        raise ConfigError(
            f"checkpoint.resume={tag} is older than {', '.join(newer)} in {output_dir}; continuing from it would "
            "overwrite them. Resume the newest, or set checkpoint.discard_newer=true to delete the newer ones"
        )
    return discard_newer(output_dir, newer) if newer else []


def weights_finite(model) -> bool:
    """True when this rank's share of the weights is finite (ZeRO-3: its partitions)."""
    for param in model.parameters():
        data = getattr(param, "ds_tensor", param)  # ZeRO-3 keeps this rank's partition there
        if data.numel() and not bool(data.isfinite().all()):
            return False
    return True


def train_state(output_dir: str | Path, tag: str) -> dict[str, Any]:
    """The trainer's own state (step, stage, data position, ...) saved with checkpoint ``tag``."""
    path = checkpoint_dir(output_dir) / tag / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {tag!r} not found (no {path})")
    return json.loads(path.read_text())


def load(
    engine, output_dir: str | Path, tag: str, saved_world_size: int | None, reshard: bool = False
) -> bool:
    """Restore model, optimizer, scheduler (through DeepSpeed) and this rank's RNG; True for an exact resume.

    On another world size than the checkpoint's (``saved_world_size``), ``reshard`` restores the weights and the
    LR schedule's position but starts a fresh optimizer state (the moments build up again) and fresh random
    streams: ZeRO partitions the optimizer state by rank, so it does not carry over. Without ``reshard`` that is
    an error naming both sizes."""
    root, world = checkpoint_dir(output_dir), ds_setup.world_size()
    other_world = saved_world_size is not None and saved_world_size != world
    if other_world and not reshard:
        raise ConfigError(
            f"checkpoint {tag} was written by {saved_world_size} ranks, this run has {world}: set "
            "checkpoint.reshard=true to continue with its weights and schedule and a fresh optimizer state"
        )
    if other_world and engine.zero_optimization_stage() == 3:
        raise ConfigError(
            f"checkpoint.reshard supports ZeRO stages 0-2; for ZeRO-3, consolidate {root / tag} with DeepSpeed's "
            "zero_to_fp32.py and start a run from it with model.init_from"
        )
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=not other_world)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    if other_world:
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO's fp32 master copy must follow the loaded weights
            refresh()
        return False
    _set_rng_state(torch.load(root / tag / f"rng_rank{ds_setup.rank()}.pt", weights_only=True))
    return True


def export_final(
    model,
    ds: dict[str, Any],
    out_dir: Path,
    tokenizer_dir: Path | None,
    mlflow_run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    *,
    standalone: bool = False,
    record: dict[str, Any] | None = None,
    card_name: str | None = None,
) -> None:
    """Write an HF-format model directory (safetensors + config with the mask + tokenizer), atomically.

    Under ZeRO-3 the parameters are gathered first; rank 0 writes. ``mlflow_run_id`` (a file) links the
    model to its pre-training run, wherever the directory is copied. ``standalone``: the model code goes beside
    the weights (:mod:`sparsebert.model.standalone`). ``record``: JSON files (name → content) the model card reads;
    with it, the card (``README.md``, :mod:`sparsebert.export.card`) is written, its loading example naming
    ``card_name``.
    """
    with ds_setup.gathered(model.parameters(), ds):
        if ds_setup.rank() == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True, standalone=standalone)
            if tokenizer_dir is not None:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
            if mlflow_run_id:
                (tmp / "mlflow_run_id").write_text(mlflow_run_id)
            if metrics:  # the step and held-out numbers of the exported weights
                (tmp / "pretraining_metrics.json").write_text(json.dumps(metrics, indent=1))
            if record is not None:
                from sparsebert.export.card import write_card

                for name, content in record.items():
                    (tmp / name).write_text(json.dumps(content, indent=1, default=str))
                with ds_setup.models_built_whole():  # rank 0 alone reads the folder back
                    write_card(tmp, model_id=card_name or str(out_dir))
            _readable_as_umask_allows(tmp)
            _swap_into_place(tmp, out_dir)
    ds_setup.barrier()


def _readable_as_umask_allows(directory: Path) -> None:
    """Give the export's files the mode a plain ``open`` would (0644 under the usual umask 022): safetensors
    creates its files 0600 whatever the umask, which colleagues on a shared filesystem could not read."""
    mode = 0o666 & ~_umask()
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def _umask() -> int:
    """This process's umask, read without setting it (``os.umask`` changes it for every thread, if briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_into_place(new: Path, target: Path) -> None:
    """Make ``new`` the directory at ``target`` without a moment in which ``target`` is missing or half-written:
    an atomic exchange where the kernel offers one (Linux ``renameat2``), else two renames."""
    if not target.exists():
        os.replace(new, target)
        return
    if not _exchange(new, target):
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        new = old
    shutil.rmtree(new)  # after the exchange, the previous directory


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # a filesystem or kernel without the exchange
    raise OSError(ctypes.get_errno(), f"cannot swap {a} into place at {b}")


# flock's answers on a filesystem without locks: NFS without lockd, Lustre mounted noflock, some FUSE mounts.
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def hold_output_dir(output_dir: str | Path):
    """Rank 0's hold on ``output_dir`` (:func:`lock_output_dir`). Another run holding it, or a filesystem without
    file locks, is a ``ConfigError`` (one line, which stops every rank during set-up)."""
    try:
        return lock_output_dir(output_dir)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None


def lock_output_dir(output_dir: str | Path):
    """Hold ``output_dir``'s lock for this process's lifetime (call on rank 0), or raise naming its holder.

    An ``flock``: the kernel drops it when the process ends however it ends, so a crashed or killed run never
    leaves it stuck. Returns the open lock file (keep a reference: closing it releases the lock)."""
    path = Path(output_dir) / LOCK
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RuntimeError(
            f"{output_dir} is in use by a running training run ({holder}); two runs on one output_dir would "
            "delete each other's checkpoints. Wait for it to end, or choose another output_dir"
        ) from None
    except OSError as err:  # a filesystem without flock (Lustre mounted noflock, NFSv3 without lockd)
        handle.close()
        if err.errno not in _NO_FLOCK:
            raise
        raise RuntimeError(
            f"{output_dir}: its filesystem does not support flock ({err.strerror}), which keeps two runs off one "
            "output_dir; mount it with locks (NFSv4, or NFSv3 with lockd; Lustre with -o flock) or choose "
            "another output_dir (cluster/MULTINODE.md lists the filesystems)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _prune(root: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for tag in prunable(tags, set(_complete_tags(root)), keep, current):
        shutil.rmtree(root / tag, ignore_errors=True)


def prunable(tags: list[str], complete: set[str], keep: int, current: str) -> list[str]:
    """Of the checkpoint ``tags`` (sorted), those to delete: all but the ``keep`` newest complete ones up to
    ``current`` (the one just written), and incomplete remains of a crashed save. Complete checkpoints newer than
    ``current`` (a run resumed from an older tag) are never among them."""
    older = [t for t in tags if t <= current and t in complete]
    return older[:-keep] + [t for t in tags if t not in complete and t != current]


def _complete_tags(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob(f"step*/{TRAIN_STATE}"))


def _rng_state() -> dict[str, Any]:
    """Every random stream a rank draws from: Python, NumPy, torch's CPU generator and, on an accelerator, the
    generator of every device it sees (dropout and DAM's Gumbel noise draw from the device's generator).
    Tensors, numbers and tuples only, so it loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = [accelerator.get_rng_state(i) for i in range(accelerator.device_count())]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
