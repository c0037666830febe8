"""Several nodes simulated on one machine: a test helper for multi-node runs of ``sparsebert/pretrain.py`` (or any
script the ``deepspeed`` launcher starts).

Each node is its own ``deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P``
launcher, as on a cluster where every node runs the command itself (Slurm, Kubernetes, by hand), with a
node-local disk: its own ``HOME``, ``SPARSEBERT_CACHE``, ``TMPDIR`` and working directory under
``root/node<N>/``. A relative path in a command (``runs/demo``, ``data/corpus``) therefore names a different
directory on every node, as it does on a cluster without a shared working directory; an absolute path under
``root`` plays the shared filesystem. Only ``TORCH_EXTENSIONS_DIR`` is shared, so DeepSpeed's C++ comm op is
compiled once for every test rather than once per node.

    with SimulatedCluster(tmp_path, nodes=2) as cluster:
        cluster.copy_to_nodes(corpus, "data/corpus")  # a node-local copy of the corpus on every node
        nodes = cluster.run(["--config", "tiny_cpu", "data.path=data/corpus", f"output_dir={tmp_path}/out"],
                            timeout=120, node_env={1: {"SPARSEBERT_FAULTS": "sigterm_at_step=3"}})
        assert all(node.returncode == 0 for node in nodes), cluster.transcript()

``start`` returns at once (then ``wait``, ``Node.signal``, ``Node.kill``); every node's output (stdout and stderr)
goes to ``root/node<N>.log`` and is read back with ``Node.output``. Nodes run in their own session, so
``SimulatedCluster.stop`` (or a timed-out ``wait``) ends each launcher with everything it started. Used as a
context manager (``with SimulatedCluster(...) as cluster:``), it stops the nodes and removes their TMPDIRs at
the end. A node's TMPDIR is a short directory of its own under /tmp, as on a real node: Ray, which prepares the
embedded corpus, puts sockets there, and a socket path may not exceed 107 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import PRETRAIN, free_port


def shared_torch_extensions_dir() -> str:
    """Where this machine keeps compiled torch extensions (DeepSpeed's comm op): shared by every node."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


@dataclass
class Node:
    """One simulated node: its directories, and its launcher once started."""

    rank: int  # the launcher's --node_rank
    root: Path  # root/node<rank>: home/, cache/, work/
    log: Path
    tmp: Path  # its TMPDIR
    process: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    timed_out: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def work(self) -> Path:
        """The node's working directory: relative paths in the command resolve here."""
        return self.root / "work"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with this node's HOME, cache and TMPDIR (and its ``extra_env``)."""
        return {
            **base,
            "HOME": str(self.home),
            "SPARSEBERT_CACHE": str(self.cache),
            "TMPDIR": str(self.tmp),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            **self.extra_env,
        }

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def seconds(self) -> float | None:
        """Wall time from start to exit (None while running)."""
        return None if self.ended is None else self.ended - self.started

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rank_pids(self) -> list[int]:
        """The processes the launcher started for its ranks (the training processes)."""
        import psutil

        if self.process is None:
            return []
        try:
            launcher = psutil.Process(self.process.pid)
            procs = launcher.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        # The ranks are the launcher's processes given --local_rank (deepspeed.launcher.launch starts them).
        return [p.pid for p in procs if any(part.startswith("--local_rank=") for part in _cmdline(p))]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to this node's training processes, as a scheduler preempting the node does."""
        for pid in self.rank_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """End the launcher and everything it started (SIGKILL to its session)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.ended = time.monotonic()

    def _poll(self) -> bool:
        """True once the launcher has exited (and records when)."""
        if self.process is None or self.process.poll() is None:
            return False
        if self.ended is None:
            self.ended = time.monotonic()
        return True


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


class SimulatedCluster:
    """``nodes`` nodes of ``ranks_per_node`` CPU ranks each, under ``root``; one hostfile names them all."""

    def __init__(
        self, root: Path, nodes: int = 2, ranks_per_node: int = 1, env: dict[str, str] | None = None
    ):
        self.root = Path(root)
        self.hostfile = self.root / "hostfile"
        self.ranks_per_node = ranks_per_node
        self.base_env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": shared_torch_extensions_dir(),
            **(env or {}),
        }
        self.nodes = [
            Node(
                n,
                self.root / f"node{n}",
                self.root / f"node{n}.log",
                Path(tempfile.mkdtemp(prefix=f"node{n}-")),
            )
            for n in range(nodes)
        ]
        for node in self.nodes:
            for path in (node.home, node.cache, node.tmp, node.work):
                path.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hostfile.write_text("".join(f"node-{n} slots={ranks_per_node}\n" for n in range(nodes)))
        self.port: int | None = None

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.ranks_per_node

    def copy_to_nodes(self, source: Path, relative: str, nodes: list[int] | None = None) -> None:
        """Copy ``source`` to ``relative`` (under the working directory) on each of ``nodes`` (default: all)."""
        for node in self.nodes:
            if nodes is None or node.rank in nodes:
                target = node.work / relative
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)

    def start(
        self,
        args: list[str],
        *,
        script: Path = PRETRAIN,
        env: dict[str, str] | None = None,
        node_env: dict[int, dict[str, str]] | None = None,
        nodes: list[int] | None = None,
    ) -> list[Node]:
        """Start the launcher of every node (or of ``nodes`` only: the others never arrive) on a fresh port."""
        self.port = free_port()
        for node in self.nodes:
            if nodes is not None and node.rank not in nodes:
                node.process = None  # never started this time
                continue
            node.extra_env = {**(env or {}), **(node_env or {}).get(node.rank, {})}
            cmd = [
                "deepspeed", "--hostfile", str(self.hostfile), "--no_ssh", "--node_rank", str(node.rank),
                "--master_addr", "127.0.0.1", "--master_port", str(self.port), str(script), *args,
            ]  # fmt: skip
            with open(node.log, "w") as log:
                node.process = subprocess.Popen(
                    cmd, cwd=node.work, env=node.env(self.base_env), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            node.started, node.ended, node.timed_out = time.monotonic(), None, False
        return self.nodes

    def wait(self, timeout: float) -> list[Node]:
        """Wait for every started node to exit; those still running after ``timeout`` seconds are killed and
        marked ``timed_out``."""
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.process is not None]
        while running and time.monotonic() < deadline:
            running = [node for node in running if not node._poll()]
            time.sleep(0.2)
        for node in running:
            node.timed_out = True
            node.kill()
        return self.nodes

    def run(self, args: list[str], timeout: float, **kwargs) -> list[Node]:
        """``start`` then ``wait``."""
        self.start(args, **kwargs)
        return self.wait(timeout)

    def stop(self) -> None:
        """Kill whatever still runs (a test's clean-up)."""
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> SimulatedCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        for node in self.nodes:
            shutil.rmtree(node.tmp, ignore_errors=True)

    def transcript(self, tail: int = 4000) -> str:
        """Every node's exit, time and last output: for assertion messages."""
        parts = []
        for node in self.nodes:
            took = f"{node.seconds:.0f}s" if node.seconds is not None else "running"
            state = "killed at the timeout" if node.timed_out else f"exit {node.returncode}"
            parts.append(f"--- node {node.rank}: {state}, {took}\n{node.output[-tail:]}")
        return "\n".join(parts)
