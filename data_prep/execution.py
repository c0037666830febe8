"""How a preparation's work runs on Ray: the session, the two stages' tasks, and a bounded, retried fan-out.

A task that raises ``TransientError`` or whose worker dies is run again by Ray (``data_prep.failures.RETRIES``);
a permanent error (the data, a setting) comes back as data and is raised in the driver as the error it was, one
line, rather than wrapped in Ray's exception type with a remote traceback.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from data_prep.failures import RETRIES, TransientError
from data_prep.shards import write_shard
from data_prep.sources import Unit
from data_prep.units import BuildConfig, build_unit


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the caller's Ray if it is running; otherwise start one (local, or ``address``) and stop it after."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _reported(fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn`` in a worker. Permanent errors come back as data, so the driver raises them as they are
    (Ray would wrap them in its own exception type, with a remote traceback); a ``TransientError`` is
    raised, for Ray to run the task again."""
    try:
        return fn(*args)
    except (ValueError, OSError) as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


def build_samples(unit: Unit, config: BuildConfig) -> dict:
    """Stage 1 task: one unit → its unit files, its record and its counts."""
    return _reported(build_unit, unit, config)


def write_shards(spec: Any, out_dir: str, schema: pa.Schema) -> dict:
    """Stage 2 task: one shard."""
    return _reported(write_shard, spec, out_dir, schema)


def run_tasks(
    items: Sequence[Any],
    fn: Callable[..., dict],
    kwargs: dict[str, Any],
    num_workers: int | None,
    *,
    what: str,
    progress: bool,
    on_done: Callable[[int], None] | None = None,
) -> list[dict]:
    """``fn(item, **kwargs)`` for every item as Ray tasks, at most ``num_workers`` at a time (default:
    Ray's CPUs); results in the order of ``items``. A task that raises ``TransientError`` or whose worker
    dies is run again by Ray (``RETRIES``); ``on_done(n)`` is called as the n-th task finishes."""
    import ray
    from tqdm import tqdm

    if not items:
        return []
    task = ray.remote(fn).options(num_cpus=1, max_retries=RETRIES, retry_exceptions=[TransientError])
    limit = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    shared = {key: ray.put(value) for key, value in kwargs.items()}  # sent once, not once per task
    results: list[dict | None] = [None] * len(items)
    pending: dict[Any, int] = {}
    queue = iter(enumerate(items))
    bar = tqdm(
        total=len(items), desc=what, disable=not progress or not sys.stderr.isatty(), leave=False
    )  # not in logs
    finished = 0  # not bar.n: a disabled bar counts nothing
    try:
        while True:
            while len(pending) < limit and (nxt := next(queue, None)) is not None:
                pending[task.remote(nxt[1], **shared)] = nxt[0]
            if not pending:
                break
            [ready], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready)
            results[index] = _result(ray, ready, index, what)
            bar.update()
            finished += 1
            if on_done is not None:
                on_done(finished)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return [_raised(result) for result in results]


def _result(ray: Any, ref: Any, index: int, what: str) -> dict:
    """A finished task's result, or a ``RuntimeError`` saying that Ray's retries ran out."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        raise RuntimeError(
            f"{what}: task {index} failed {RETRIES + 1} times, last with {type(cause).__name__}: {cause}"
        ) from None
    except ray.exceptions.RayError as exc:  # a worker or node lost more often than Ray retries
        raise RuntimeError(f"{what}: task {index} failed {RETRIES + 1} times: {exc}") from None


def _raised(result: dict) -> dict:
    """``result``, unless it reports a permanent error (``_reported``): that error is raised, as its type."""
    if "error" in result:
        error = getattr(builtins, result["error"], None)
        error = error if isinstance(error, type) and issubclass(error, Exception) else RuntimeError
        raise error(result["message"])
    return result
