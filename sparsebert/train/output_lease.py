"""One run at a time per object-storage ``output_dir``: a lease object that rank 0 holds and renews.

A local ``output_dir`` has an ``flock`` (``checkpoint.lock_output_dir``), which the kernel drops when the holder
dies; object stores have neither locks nor an atomic create-if-absent that every server offers. So rank 0 writes
``output_dir/.lease`` (who holds it, a random token) and rewrites it every ``ttl / 3`` seconds from a thread:

* **Taking it.** No lease, or one not renewed for ``ttl`` seconds, is taken: one whose time stamp is far older
  than ``ttl`` at once, otherwise after watching it for ``ttl`` seconds of this machine's own clock (so clock
  differences between nodes cannot make a live lease look dead). A lease that changes while watched belongs to
  a live run: refused, naming its holder. A run restarted after a crash therefore waits up to ``ttl``.
* **Two starting at once.** After writing its lease a run waits a moment and reads it back; the run whose lease
  is not there (the other one wrote last) stops.
* **Fencing.** Before a checkpoint moves ``latest``, rank 0 checks that the lease is still its own
  (:meth:`Lease.held`): a run that lost it (partitioned from the store for longer than ``ttl`` while another
  took over) stops without publishing anything.

``ttl`` is ``$SPARSEBERT_LEASE_SECONDS`` (default 60).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from sparsebert.storage import Location, StorageError

LEASE = ".lease"
DEFAULT_TTL = 60.0


def lease_seconds() -> float:
    value = os.environ.get("SPARSEBERT_LEASE_SECONDS", str(DEFAULT_TTL))
    try:
        ttl = float(value)
    except ValueError:
        raise ValueError(f"SPARSEBERT_LEASE_SECONDS must be a number of seconds, got {value!r}") from None
    if ttl <= 0:
        raise ValueError(f"SPARSEBERT_LEASE_SECONDS must be > 0, got {value!r}")
    return ttl


class Lease:
    """Rank 0's claim on ``output_dir`` (a remote :class:`~sparsebert.storage.Location`)."""

    def __init__(self, output_dir: Location, ttl: float | None = None, report=print) -> None:
        self.output_dir, self.location = output_dir, output_dir / LEASE
        self.ttl = lease_seconds() if ttl is None else ttl
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._report = report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None  # the holder that took the lease over, once seen

    def acquire(self) -> None:
        """Take the lease (see the module docstring), or raise ``RuntimeError`` naming the run that holds it."""
        current = self._read()
        if current is not None and time.time() - current.get("renewed", 0) < 3 * self.ttl:
            self._report(
                f"{self.location.uri} names a training run ({current.get('holder')}); waiting up to "
                f"{self.ttl:.0f} s to see whether it is still alive"
            )
            deadline = time.monotonic() + self.ttl
            while time.monotonic() < deadline:
                time.sleep(min(1.0, self.ttl / 10))
                now = self._read()
                if now is None:  # released: its run ended
                    break
                if now != current:
                    raise RuntimeError(
                        f"{self.output_dir.uri} is in use by a running training run ({now.get('holder')}); "
                        "two runs on one output_dir would delete each other's checkpoints. Wait for it to end, "
                        "or choose another output_dir"
                    )
        self._write()
        time.sleep(min(2.0, self.ttl / 10))  # a run that started at the same moment writes within it
        now = self._read()
        if now is None or now.get("token") != self.token:
            raise RuntimeError(
                f"{self.output_dir.uri} was claimed at the same moment by another training run "
                f"({(now or {}).get('holder')}); this one stops"
            )
        self._thread = threading.Thread(target=self._renew, name="sparsebert-lease", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        """True while the lease is still this run's (read from the store, not remembered)."""
        if self._lost is None:
            try:
                now = self._read()
            except StorageError:
                return False
            if now is None or now.get("token") != self.token:
                self._lost = (now or {}).get("holder", "nobody")
        return self._lost is None

    def lost_to(self) -> str:
        return self._lost or "nobody"

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still this run's (once; later calls do nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self.held():
                self.location.delete()
        except StorageError as exc:
            self._report(f"warning: could not release {self.location.uri} ({exc}); it expires by itself")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.held():
                    return  # fenced: the next checkpoint stops the run
                self._write()
            except StorageError as exc:  # the store is unreachable for now: the next renewal tries again
                self._report(f"warning: could not renew {self.location.uri} ({exc})")

    def _write(self) -> None:
        record = {"holder": self.holder, "token": self.token, "renewed": time.time(), "ttl": self.ttl}
        self.location.write_text(json.dumps(record))

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.location.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # no run writes this: nobody holds it
            return {"holder": "an unreadable lease", "renewed": 0}
        return record if isinstance(record, dict) else None
