"""Preemption: SIGTERM (and SIGUSR1, which Slurm sends ahead of a job's time limit) ask the run to stop.

A signal only sets a flag; the trainer asks :meth:`StopRequest.agreed` at each step boundary, which every rank
answers together (a host-side vote, so a signal that reached one rank stops them all at the same step). The
trainer then writes a checkpoint and exits 0; rerunning the same command resumes from it.
"""

from __future__ import annotations

import signal
import threading

from sparsebert.train import distributed as ds_setup

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches :data:`SIGNALS` for the life of the run (installed from the main thread)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal."""
        return ds_setup.any_rank(self.received is not None)

    @property
    def reason(self) -> str:
        return self.received.name if self.received is not None else "a stop signal on another rank"
