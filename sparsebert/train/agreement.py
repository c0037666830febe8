"""Ranks agree, or every rank stops: how the ranks of a (multi-node) run set up together.

* :func:`rendezvous`: every rank of the launcher's world joins within the set-up timeout
  (``SPARSEBERT_SETUP_TIMEOUT`` seconds, 60 by default) through a ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT``,
  which then carries the process group. A node that never arrives stops the others with one line naming the
  missing ranks, instead of a wait as long as the collective timeout.
* :class:`all_or_none`: from the rendezvous until every rank has finished set-up, an exception on any rank (of
  any type) is posted to the store. A watchdog thread on every other rank sees it within a second, prints one
  line per node naming the failed rank and its error, and ends its process: also when the main thread waits in
  a collective the failed rank will never reach (a device collective cannot be interrupted otherwise). The rank
  that failed reports its own error, once.
* :func:`decide` (rank 0 computes, every rank gets its answer), :func:`gather`, :func:`agree` (a value must be
  the same on every rank) and :func:`on_each_node` (local rank 0 of every node computes, its node's ranks get
  the answer) go through the same store, so a failure while one rank computes stops the waiting ones too.
* :func:`check_shared_dir`: a directory (``output_dir``) is the same directory on every rank.

Set-up waits are host-side and never on the device's queue; training keeps DeepSpeed's collective timeout.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from deepspeed.constants import default_pg_timeout

from sparsebert.console import Stopped
from sparsebert.train.config import ConfigError

TIMEOUT_ENV = "SPARSEBERT_SETUP_TIMEOUT"
POLL_S = 0.25  # how often a waiting rank looks for a failure posted by another
ACK_WAIT_S = 10.0  # rank 0 hosts the store: it stays until the others have read a failure, at most this long
NODE_WORK_TIMEOUT = timedelta(hours=1)  # a node's local rank 0 preparing a corpus or downloading a model
PREFIX = "sparsebert/"
FAILURE, ACKS = PREFIX + "setup/failure", PREFIX + "setup/acks"
MARKER = ".shared_check"  # rank 0 writes a fresh token here; every rank must read it back

_STORE: dist.TCPStore | None = None
_SEQUENCE = 0  # every rank makes the same agreement calls in the same order: the n-th call's keys match


def forget() -> None:
    """Drop the store (the process group was destroyed; a test forms another)."""
    global _STORE, _SEQUENCE
    _STORE, _SEQUENCE = None, 0


def setup_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "60")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def node() -> str:
    """This rank's node: the launcher's node rank (DeepSpeed's CROSS_RANK, torchrun's GROUP_RANK, Slurm's
    SLURM_NODEID) with the host name; names differ between nodes even where host names do not."""
    for key in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if key in os.environ:
            return f"node_rank {os.environ[key]}, host {socket.gethostname()}"
    return f"host {socket.gethostname()}"


def where() -> str:
    return f"rank {rank()} ({node()})"


def rendezvous() -> dist.TCPStore | None:
    """Meet every rank of the world at ``MASTER_ADDR:MASTER_PORT`` within the set-up timeout; the store returned
    then serves the process group (with the long timeout) and the agreements below."""
    global _STORE
    if _STORE is not None or dist.is_initialized():  # (tests form a group of one themselves)
        return _STORE
    address, port, timeout = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), setup_timeout()
    at, seconds = (
        f"{address}:{port} (MASTER_ADDR:MASTER_PORT)",
        f"{timeout.total_seconds():g} s ({TIMEOUT_ENV})",
    )
    try:
        # Under torchrun the launcher's agent holds the store already; ranks join it (as torch's env:// does).
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            address,
            port,
            world_size(),
            is_master=rank() == 0 and not agent,
            timeout=timeout,
            wait_for_workers=False,
        )
    except dist.DistError as err:
        if rank() == 0:
            _stop(f"cannot open the rendezvous at {at}: {err}")
        _stop(
            f"{where()} could not reach rank 0 at {at} within {seconds}: the first node of the hostfile was not "
            "started, failed before joining (its own output says why), or is not reachable at that address"
        )
    try:
        store.set(f"{PREFIX}arrived/{rank()}", node())
        if store.add(PREFIX + "arrived", 1) == world_size():
            store.set(PREFIX + "all_arrived", "1")
        _wait(store, [PREFIX + "all_arrived"], timeout)
    except dist.DistNetworkError:
        _stop(f"{where()} lost rank 0 at {at} during the rendezvous: its own output says why")
    except dist.DistStoreError:
        missing = [r for r in range(world_size()) if not store.check([f"{PREFIX}arrived/{r}"])]
        _stop(
            f"only {world_size() - len(missing)} of {world_size()} ranks joined at {at} within {seconds}; "
            f"missing: rank {', '.join(map(str, missing))}. Their node was not started, failed before joining "
            "(its own output says why), or cannot reach this address"
        )
    store.set_timeout(default_pg_timeout)  # from here on, waits are as patient as training's collectives
    _STORE = store
    return store


class all_or_none:  # a statement: `with agreement.all_or_none(): ...`
    """Every rank finishes the block, or every rank stops: see the module's docstring. On the rank whose error
    is reported, a ``ConfigError`` is printed here as one line (then :class:`~sparsebert.console.Stopped`, exit
    status 2); any other exception propagates with its traceback. The other ranks raise ``Stopped`` (status 1)
    or end from the watchdog."""

    def __enter__(self) -> all_or_none:
        self.watchdog = _Watchdog() if _STORE is not None and world_size() > 1 else None
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self.watchdog is None:
            return False
        if error is None:
            try:
                # The watchdog ends this process if another rank fails while this one waits here.
                _barrier(_STORE, "setup/done")
            except dist.DistError:
                _stop(f"not every rank finished set-up within {default_pg_timeout} (DEEPSPEED_TIMEOUT)")
            self.watchdog.stopped.set()
            return False
        self.watchdog.own_failure.set()
        text = str(error) if isinstance(error, ConfigError) else f"{kind.__name__}: {error}".strip(": ")
        record = json.dumps({"rank": rank(), "node": node(), "message": text.splitlines()[0] if text else ""})
        client = self.watchdog.client
        first = json.loads(client.compare_set(FAILURE, "", record))
        if first["rank"] != rank():
            client.add(ACKS, 1)
        if rank() == 0:
            _await_acks(client)
        if first["rank"] == rank():
            if isinstance(error, ConfigError):
                print(f"error: {text}", file=sys.stderr, flush=True)
                raise Stopped(2) from error
            return False  # a traceback, once: the other ranks stop without one
        if local_rank() == 0 and first["node"] != node():
            print(f"error: {_describe(first)}", file=sys.stderr, flush=True)
        raise Stopped(1) from error


class _Watchdog(threading.Thread):
    """Ends this process when another rank posts a set-up failure (or rank 0, which holds the store, is gone).
    Its own connection to the store: the main thread's may be blocked in a wait."""

    def __init__(self) -> None:
        super().__init__(name="sparsebert-setup-watchdog", daemon=True)
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.client = dist.TCPStore(
            address, port, is_master=False, timeout=setup_timeout(), wait_for_workers=False
        )
        self.rank0 = self.client.get(f"{PREFIX}arrived/0").decode()  # for the message once rank 0 is gone
        self.stopped, self.own_failure = threading.Event(), threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(POLL_S):
            try:
                if not self.client.check([FAILURE]):
                    continue
                failure = json.loads(self.client.get(FAILURE))
            except dist.DistError:
                failure = None  # rank 0's process, which holds the store, has ended
            if self.stopped.is_set() or self.own_failure.is_set():
                return
            message = (
                _describe(failure)
                if failure
                else f"rank 0 ({self.rank0}) ended during set-up; its output says why"
            )
            if local_rank() == 0 and (failure is None or failure["node"] != node()):
                print(f"error: {message}", file=sys.stderr, flush=True)
            if failure is not None:
                try:
                    self.client.add(ACKS, 1)
                    if rank() == 0:
                        _await_acks(self.client)
                except dist.DistError:
                    pass
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # the main thread may be inside a collective that never returns


def _describe(failure: dict[str, Any]) -> str:
    return f"rank {failure['rank']} ({failure['node']}) failed during set-up: {failure['message']}; every rank stops"


def _await_acks(client) -> None:
    """Rank 0 holds the store: keep it until every other rank has read the failure (bounded)."""
    deadline = time.monotonic() + ACK_WAIT_S
    while client.add(ACKS, 0) < world_size() - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop(message: str) -> None:
    """A set-up error every rank of a node meets alike: one line per node, then exit status 1."""
    if local_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise Stopped(1)


def _wait(store, keys: list[str], timeout: timedelta) -> None:
    """``store.wait`` in short slices, so that signals reach this (main) thread while it waits."""
    deadline = time.monotonic() + timeout.total_seconds()
    while not store.check(keys):
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"timed out after {timeout} waiting for {keys}")
        time.sleep(POLL_S)


def _key(name: str) -> str:
    """The store key of the next agreement: ``name`` must be the same on every rank (no node-local paths)."""
    global _SEQUENCE
    _SEQUENCE += 1
    return f"{PREFIX}{_SEQUENCE}/{name}"


def _barrier(store, name: str) -> None:
    key = _key(name)
    if store.add(key, 1) == world_size():
        store.set(key + "/all", "1")
    _wait(store, [key + "/all"], default_pg_timeout)


def _distributed() -> bool:
    return _STORE is not None and world_size() > 1


def decide(name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0 (a JSON value), returned on every rank. An error in it stops every rank."""
    value = json.loads(json.dumps(compute())) if rank() == 0 else None
    if not _distributed():
        return value
    key = _key(name)
    if rank() == 0:
        _STORE.set(key, json.dumps(value))
        return value
    _wait(_STORE, [key], default_pg_timeout)
    return json.loads(_STORE.get(key))


def gather(name: str, value: Any) -> list[Any] | None:
    """Every rank's ``value`` (JSON) and where it is (``{"value": ..., "where": ...}``), in rank order, on rank 0;
    None on the others."""
    report = {"value": value, "where": where()}
    if not _distributed():
        return [report]
    key = _key(name)
    _STORE.set(f"{key}/{rank()}", json.dumps(report))
    if rank() != 0:
        return None
    keys = [f"{key}/{r}" for r in range(world_size())]
    _wait(_STORE, keys, default_pg_timeout)
    return [json.loads(v) for v in _STORE.multi_get(keys)]


def agree(name: str, value: Any, differences: Callable[[Any, Any], str]) -> None:
    """Stop every rank unless ``value`` is the same on all; ``differences(rank 0's, another's)`` says how two
    differ, for the error (which names ``name`` and the ranks)."""
    reports = gather(name, value)

    def verdict() -> None:
        odd = [r for r in reports if r["value"] != reports[0]["value"]]
        if odd:
            raise ConfigError(
                f"{name} differs between ranks: {odd[0]['where']} has {differences(reports[0]['value'], odd[0]['value'])} "
                f"than {reports[0]['where']}{f' (and {len(odd) - 1} more ranks)' if len(odd) > 1 else ''}. Every node "
                "must run the same command on the same files"
            )

    decide(name + "/verdict", verdict)


def differing_keys(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (a config's ``to_dict()``)."""
    keys = []
    for key in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "attention_pattern":
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def on_each_node(name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a JSON value) on local rank 0 of every node, returned to that node's ranks: work that fills
    a node's own cache (a corpus, a downloaded model), done once per node."""
    if not _distributed():
        return compute()
    key = f"{_key(name)}/{node()}"
    if local_rank() == 0:
        value = compute()
        _STORE.set(key, json.dumps(value))
        return value
    _wait(_STORE, [key], NODE_WORK_TIMEOUT)
    return json.loads(_STORE.get(key))


def check_shared_dir(path: Path, config_key: str) -> None:
    """Stop every rank unless ``path`` is one directory on all of them: rank 0 creates it and writes a fresh
    token into it, which every rank must read back (a relative path, or a node-local disk, fails here)."""
    if not _distributed():
        path.mkdir(parents=True, exist_ok=True)
        return
    token = decide(f"{config_key}/token", lambda: _write_marker(path))
    seen = _read_marker(path, token)
    reports = gather(f"{config_key}/seen", {"seen": seen, "path": str(path.absolute())})

    def verdict() -> None:
        apart = [r for r in reports if not r["value"]["seen"]]
        if apart:
            others = "; ".join(f"{r['where']} does not see it at {r['value']['path']}" for r in apart)
            raise ConfigError(
                f"{config_key} {str(path)!r} is not one directory shared by every node: {reports[0]['where']} "
                f"writes to {reports[0]['value']['path']}, but {others}. Every rank writes and reads its checkpoints there: "
                f"set {config_key} to an absolute path on a filesystem every node mounts at the same place "
                f"(e.g. {config_key}=/shared/runs/{path.name})"
            )

    decide(f"{config_key}/verdict", verdict)


def _write_marker(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    with open(path / MARKER, "w") as marker:  # in place, not renamed: NFS revalidates an open file's content
        marker.write(token)
        marker.flush()
        os.fsync(marker.fileno())
    return token


def _read_marker(path: Path, token: str, patience_s: float = 5.0) -> bool:
    """Whether ``path`` holds rank 0's token; retried briefly: a network filesystem may cache the directory."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if (path / MARKER).read_text().strip() == token:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
