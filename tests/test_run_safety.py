"""What keeps a long run safe, piece by piece: the output_dir lock, resume checks, pruning, the atomic final/
swap, RNG states that load with weights_only=True, and optimizer steps guarded against non-finite gradients.
(The end-to-end versions, through the deepspeed launcher, are in tests/test_pretrain.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sparsebert.train import checkpoint
from sparsebert.train.config import ConfigError, load_config, run_changes
from sparsebert.train.optim import GuardedSteps


def test_a_second_run_on_an_output_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    held = checkpoint.lock_output_dir(tmp_path)
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
        checkpoint.lock_output_dir(tmp_path)
    held.close()
    code = f"from sparsebert.train import checkpoint; h = checkpoint.lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert any(line.strip() == "locked" for line in iter(holder.stdout.readline, ""))  # (after any warning)
    with pytest.raises(RuntimeError, match="in use by a running training run"):
        checkpoint.lock_output_dir(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    checkpoint.lock_output_dir(tmp_path).close()  # the kernel dropped the dead holder's lock


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK], ids=["lustre noflock", "nfs without lockd"])
def test_an_output_dir_whose_filesystem_has_no_flock_is_refused_in_one_line(tmp_path, monkeypatch, code):
    """lock_output_dir's refusal; hold_output_dir (the trainer's, on rank 0) makes it and a held lock one-line
    ConfigErrors, which stop every rank during set-up (agreement.all_or_none)."""

    def unsupported(fd, operation):  # what such a filesystem answers
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.fcntl, "flock", unsupported)
    with pytest.raises(
        RuntimeError, match=rf"^{tmp_path}: its filesystem does not support flock \("
    ) as raised:
        checkpoint.lock_output_dir(tmp_path)
    assert "Lustre with -o flock" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: its filesystem does not support flock \("):
        checkpoint.hold_output_dir(tmp_path)
    monkeypatch.undo()
    held = checkpoint.hold_output_dir(tmp_path)
    with pytest.raises(ConfigError, match="in use by a running training run"):
        checkpoint.hold_output_dir(tmp_path)
    held.close()


def _fake_checkpoint(out, step: int, config) -> str:
    tag = f"step{step:08d}"
    path = checkpoint.checkpoint_dir(out) / tag
    path.mkdir(parents=True)
    (path / checkpoint.TRAIN_CONFIG).write_text(json.dumps(config.to_dict()))
    (path / checkpoint.TRAIN_STATE).write_text(json.dumps({"step": step}))
    return tag


def test_resuming_with_a_changed_run_is_refused_naming_the_keys(tmp_path):
    config = load_config("tiny_cpu", [f"output_dir={tmp_path}"])
    tag = _fake_checkpoint(tmp_path, 4, config)
    longer = load_config("tiny_cpu", [f"output_dir={tmp_path}", "train.max_steps=900", "checkpoint.every=7"])
    point = checkpoint.resume_point(tmp_path, tag)
    checkpoint.check_resume(tmp_path, point, longer)  # length, cadence, where output goes: neutral
    changed = load_config("tiny_cpu", [f"output_dir={tmp_path}", "train.lr=0.5", "model.size=mini"])
    assert run_changes(config.to_dict(), changed) == ["model.size", "train.lr"]
    with pytest.raises(ConfigError, match=r"model\.size, train\.lr"):
        checkpoint.check_resume(tmp_path, point, changed)
    allowed = load_config(
        "tiny_cpu", [f"output_dir={tmp_path}", "train.lr=0.5", "checkpoint.allow_config_change=true"]
    )
    checkpoint.check_resume(tmp_path, point, allowed)


def test_an_older_tag_keeps_the_newer_checkpoints_unless_asked(tmp_path):
    config = load_config("tiny_cpu", [f"output_dir={tmp_path}"])
    old, new = _fake_checkpoint(tmp_path, 4, config), _fake_checkpoint(tmp_path, 8, config)
    point = checkpoint.resume_point(tmp_path, old)
    assert point["newer"] == [new] and point["train_state"] == {"step": 4}
    with pytest.raises(ConfigError, match="step00000008"):
        checkpoint.check_resume(tmp_path, point, config)
    assert (checkpoint.checkpoint_dir(tmp_path) / new).is_dir()
    checkpoint.check_resume(tmp_path, point, load_config("tiny_cpu", ["checkpoint.discard_newer=true"]))
    assert not (checkpoint.checkpoint_dir(tmp_path) / new).exists()


def test_pruning_keeps_newer_complete_checkpoints_and_removes_crashed_remains(tmp_path):
    config = load_config("tiny_cpu", [])
    for step in (2, 4, 6, 10):
        _fake_checkpoint(tmp_path, step, config)
    root = checkpoint.checkpoint_dir(tmp_path)
    (root / "step00000012").mkdir()  # a save that crashed before its train_state.json
    checkpoint._prune(root, keep=2, current="step00000006")
    assert sorted(p.name for p in root.iterdir()) == ["step00000004", "step00000006", "step00000010"]


def test_final_is_swapped_into_place(tmp_path):
    final, new = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    checkpoint._swap_into_place(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["final"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.save(checkpoint._rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_guarded_steps_skip_non_finite_gradients_and_report_the_norm_before_clipping():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = GuardedSteps(torch.optim.SGD([weight], lr=0.1), max_norm=1.0)
    weight.grad = torch.tensor([3.0, 4.0, 0.0])
    optimizer.step()
    assert not optimizer.overflow and float(optimizer._global_grad_norm) == pytest.approx(5.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([0.94, 0.92, 1.0]))  # clipped to norm 1
    before = weight.detach().clone()
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), before)
