"""An arm's pre-training under the ``deepspeed`` launcher, with the study's ``launch`` block as its flags.

One launcher starts every node over SSH (a ``hostfile``), or, with ``no_ssh``, each node runs the study itself
(``--node-rank N``) and so its own launcher for every arm, as ``cluster/pretrain.sbatch`` does for one run.

The launcher ignores SIGUSR1 (the ranks catch it themselves): SIGTERM or SIGUSR1 to the study (``kill``, Slurm's
``--signal=B:USR1``) is passed on to the ranks as SIGUSR1, so every rank checkpoints at its next step and stops,
and the same command resumes.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sparsebert.schema import ConfigError
from sparsebert.study.config import LaunchConfig

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain.py"
FLAGS = ("hostfile", "num_nodes", "num_gpus", "include", "exclude", "master_addr")
FREE_PORT = "FREE_PORT"  # the dry run's stand-in for the free port a local launch picks


def check_launch(launch: LaunchConfig, node_rank: int | None) -> int | None:
    """The node's rank this study launches as (None without ``no_ssh``); an inconsistent block is a
    :class:`ConfigError` naming the key."""
    rank = node_rank if node_rank is not None else launch.node_rank
    if launch.no_ssh:
        if launch.hostfile is None:
            raise ConfigError(
                "config key 'launch.no_ssh' needs launch.hostfile (the nodes every launcher joins)"
            )
        if rank is None:
            raise ConfigError(
                "config key 'launch.no_ssh': give this node's index, --node-rank N (e.g. $SLURM_NODEID) or "
                "launch.node_rank"
            )
        if launch.master_addr is None:
            raise ConfigError(
                "config key 'launch.no_ssh' needs launch.master_addr (the first node's address)"
            )
        return rank
    if rank is not None:
        raise ConfigError(
            "--node-rank (launch.node_rank) is for launch.no_ssh: true, where each node launches itself"
        )
    return None


def on_this_machine(launch: LaunchConfig) -> bool:
    """Whether every rank runs here (no hostfile, no other master): a free port then avoids clashes."""
    return launch.hostfile is None and launch.master_addr is None


def launcher_words(launch: LaunchConfig, node_rank: int | None, port: int | str | None) -> list[str]:
    """``deepspeed`` and its flags."""
    words = ["deepspeed"]
    for flag in FLAGS:
        value = getattr(launch, flag)
        if value is not None:
            words += [f"--{flag}", str(value)]
    if port is not None:
        words += ["--master_port", str(port)]
    if launch.no_ssh:
        words += ["--no_ssh", "--node_rank", str(node_rank)]
    return words


def master_port(launch: LaunchConfig, dry_run: bool = False) -> int | str | None:
    """The port this launch uses: the block's, else a free one on this machine alone, else DeepSpeed's own."""
    if launch.master_port is not None:
        return launch.master_port
    if on_this_machine(launch):
        return FREE_PORT if dry_run else _free_port()
    return None


def pretrain_words(base: str, overrides: list[str]) -> list[str]:
    return [str(PRETRAIN), "--config", base, *overrides]


def show(words: list[str]) -> str:
    return shlex.join(words).replace(str(PRETRAIN), "sparsebert/pretrain.py")


def run_launcher(words: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run the launcher to its end; (exit status, whether a stop signal reached the study meanwhile)."""
    # `trap '' USR1`: the launcher ignores it (an ignored signal stays ignored across exec, into its children);
    # the ranks' own handler (sparsebert.train.preemption) turns it into a checkpoint and a clean stop.
    command = ["sh", "-c", 'trap "" USR1; exec "$@"', "sh", _deepspeed(), *words[1:]]
    forward = _Forwarder()
    previous = {sig: signal.signal(sig, forward) for sig in _Forwarder.CAUGHT}
    try:
        forward.proc = subprocess.Popen(command, env=env)
        code = forward.proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, bool(forward.received)


class _Forwarder:
    """The study's handler of SIGTERM and SIGUSR1 (a scheduler's stop, ``kill``): SIGUSR1 to every process the
    launcher started, so the ranks checkpoint at their next step and stop. Ctrl-C reaches the whole foreground
    process group by itself and stops at once, as it does ``pretrain.py``."""

    CAUGHT = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.received: list[int] = []

    def __call__(self, signum: int, frame) -> None:
        import psutil

        self.received.append(signum)
        print(f"\nstudy: {signal.Signals(signum).name}: every rank checkpoints at its next step and stops",
              file=sys.stderr, flush=True)  # fmt: skip
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGUSR1)


def _deepspeed() -> str:
    """The ``deepspeed`` launcher of this Python (its scripts directory first, then PATH)."""
    beside = Path(sys.executable).with_name("deepspeed")
    if beside.is_file():
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise ConfigError("the deepspeed launcher is not installed here (pip install deepspeed)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
