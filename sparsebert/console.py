"""What the entry points print: one-line usage errors, no library noise a user cannot act on, and progress that
suits the output (a bar on a terminal, a plain line every ~30 s in a log file).

Imports nothing heavy: the entry points call it before torch, DeepSpeed, Ray or MLflow are loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

# Messages libraries print that need no action from our users, by logger name: substrings of the message.
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    # DeepSpeed's accelerator detection on a machine without a GPU: the run prints its device anyway.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # Ray's notice that token authentication is on for a local cluster (it stays on; cluster/*.yaml rely on it).
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
}
# Python warnings the same way: (category, message regex).
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, ".*"),  # libraries announcing their own future changes
    (UserWarning, ".*TypedStorage is deprecated.*"),
    (UserWarning, ".*pkg_resources is deprecated.*"),
)

PLAIN_PROGRESS_EVERY_S = 30.0


class _DropKnown(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_libraries(verbose: bool = False) -> None:
    """Drop the known library notices (``KNOWN_NOISE``, ``KNOWN_WARNINGS``) unless ``verbose``.

    Set in the environment too, so that processes this one starts (launcher ranks, Ray workers) inherit it."""
    if verbose:
        os.environ["SPARSEBERT_VERBOSE"] = "1"
        return
    for name, fragments in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(_DropKnown(fragments))
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI colour on Ray's "(pid=...)" prefixes
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its database set-up and system-metrics notes
    # torch's C++ warnings: a rank retrying to reach the rendezvous before rank 0 has opened it (errors stay)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if not sys.stdout.isatty():
        os.environ.setdefault("NO_COLOR", "1")


def verbose() -> bool:
    """Whether the user asked for every library message (``-v``), in this process or the one that started it."""
    return os.environ.get("SPARSEBERT_VERBOSE") == "1"


def is_rank0() -> bool:
    """Rank 0 of a launched job, or a process started without a launcher."""
    return os.environ.get("RANK", "0") == "0"


class Stopped(Exception):
    """The run stopped, and why was printed already (by this rank or, once, by the one that failed)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped with exit status {code}")
        self.code = code


def usage_error(err: BaseException, prog: str = "") -> int:
    """``error: ...`` once (rank 0 under a launcher, which gives every rank the same config), exit status 2."""
    if is_rank0():
        print(f"{prog + ': ' if prog else ''}error: {err}", file=sys.stderr, flush=True)
    return 2


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = "") -> Any:
    """A tqdm bar on a terminal; in a log file (no TTY), a plain line at most every ~30 s."""
    if enabled and (sys.stderr.isatty() or verbose()):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc or None, dynamic_ncols=True)
    return PlainProgress(total, initial, enabled, desc)


class PlainProgress:
    """tqdm's ``update``/``set_postfix``/``close`` as occasional whole lines: no ``\\r``, no ANSI codes."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str) -> None:
        self.total, self.n, self.enabled, self.desc = total, initial, enabled, desc
        self.postfix = ""
        self._last = time.monotonic()
        self._printed: tuple[int, str] = (initial, "")

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= PLAIN_PROGRESS_EVERY_S:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """The last line, with the latest numbers (unless they were just printed)."""
        if (self.n, self.postfix) != self._printed:
            self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        self._printed = (self.n, self.postfix)
        if self.enabled:
            head = f"{self.desc}: " if self.desc else ""
            tail = f"  {self.postfix}" if self.postfix else ""
            print(f"{head}{self.n}/{self.total}{tail}", file=sys.stderr, flush=True)
