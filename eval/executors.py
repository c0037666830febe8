"""Where an evaluation's jobs run: as Ray tasks (:class:`OnRay`), or one after another in this process
(:class:`InProcess`, ``--no-ray``). Both take job attempts and hand each back as it finishes, with its result or its
error as one line and a full traceback; the recording, retries and table around them are :mod:`eval.runner`'s.

On Ray each job asks for one GPU when the cluster has GPUs (none on CPU), so Ray runs as many side by side as the
cluster holds. In process the jobs run in the driver, on its GPU if it has one, and ``ray`` is never imported.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Protocol

from eval.jobs import Job
from eval.tasks import TaskSpec

log = logging.getLogger("eval")


def job_entry(job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> dict[str, Any]:
    """What a job runs. ``task`` and ``fail_attempts`` come from the driver: a Ray worker on another node
    shares neither its registry (a task registered at run time) nor its environment (the fault switch).
    Imports here so the recorded interval includes a Ray worker's import time."""
    start = time.time()
    from eval.finetune import run_job

    result = run_job(job, attempt, task, fail_attempts)
    result["start_time"] = start
    return result


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:1000]


def _describe_local(exc: BaseException) -> tuple[str, str]:
    """A one-line error and the full traceback for the record."""
    return _one_line(exc), "".join(traceback.format_exception(exc))


def _describe_ray(exc: BaseException) -> tuple[str, str]:
    """Like :func:`_describe_local`, naming the job's own exception when Ray wrapped it."""
    import ray

    details = "".join(traceback.format_exception(exc))
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if cause is None or isinstance(cause, ray.exceptions.RayError):
        # Not the job's own exception (it could not be shipped back, or Ray itself failed): the last line of
        # the (remote) traceback still names it.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return (lines[-1] if lines else type(exc).__name__)[:1000], details
    return _one_line(cause), details


@dataclass
class Done:
    """One finished attempt: the job as it ran, and its result or its error (one line, full text)."""

    job: Job
    attempt: int
    result: dict[str, Any] | None = None
    error: str = ""
    details: str = ""


class Executor(Protocol):
    """Runs job attempts and hands back each as it finishes; what differs between Ray and in-process."""

    tags: dict[str, str]  # recorded on every finished nested run

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        """Start (or queue) :func:`job_entry` with these arguments."""

    def pending(self) -> int: ...

    def next_done(self) -> Done: ...

    def close(self) -> None: ...


class InProcess:
    """Runs the jobs one after another in this process, on its GPU if torch sees one (``--no-ray``)."""

    def __init__(self) -> None:
        self.tags = {"sparsebert.executor": "in-process"}
        self._queue: deque[tuple[Job, int, TaskSpec, int]] = deque()
        log.info("running in this process, one job at a time")

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        self._queue.append((job, attempt, task, fail_attempts))  # a retry goes to the back, as on Ray

    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> Done:
        job, attempt, task, fail_attempts = self._queue.popleft()
        try:
            return Done(job, attempt, job_entry(job, attempt, task, fail_attempts))
        except Exception as exc:  # KeyboardInterrupt passes: the run is marked KILLED and can be resumed
            return Done(job, attempt, None, *_describe_local(exc))
        finally:
            _free_accelerator()

    def close(self) -> None:
        pass


def _free_accelerator() -> None:
    """Give the next job the whole GPU: a failed job's traceback frames can keep its model alive in a cycle."""
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch here: the driver stays light until a job runs
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class OnRay:
    """Runs every job as a Ray task (side by side as the cluster allows); starts or joins Ray."""

    def __init__(
        self, address: str | None, cpus_per_job: float, gpus_per_job: float | None, device: str
    ) -> None:
        import ray

        self._ray = ray
        self._started = _start_ray(address)
        self._pending: dict[Any, tuple[Job, int]] = {}
        try:
            gpus = gpus_per_job
            if gpus is None:  # a job forced onto the CPU need not hold a GPU
                gpus = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
            self.gpus = gpus
            self.tags = {"sparsebert.executor": "ray", "ray.num_gpus": str(gpus)}
            self._remote = ray.remote(job_entry).options(num_cpus=cpus_per_job, num_gpus=gpus, max_retries=0)
            log.info("running on Ray: %s, %s GPU per job", ray.cluster_resources(), gpus)
        except BaseException:
            self.close()
            raise

    def submit(self, job: Job, attempt: int, task: TaskSpec, fail_attempts: int) -> None:
        job = device_for_ray(job, self.gpus)
        self._pending[self._remote.remote(job, attempt, task, fail_attempts)] = (job, attempt)

    def pending(self) -> int:
        return len(self._pending)

    def next_done(self) -> Done:
        (ref,), _ = self._ray.wait(list(self._pending), num_returns=1)
        job, attempt = self._pending.pop(ref)
        try:
            return Done(job, attempt, self._ray.get(ref))
        except Exception as exc:  # a job's own error, a crashed worker, a lost node: all retried
            return Done(job, attempt, None, *_describe_ray(exc))

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def device_for_ray(job: Job, gpus: float) -> Job:
    """A job given GPUs by Ray must use one: ``auto`` becomes ``cuda``, so a worker that cannot see its GPU
    fails loudly instead of training on the CPU. ``cpu`` and ``cuda`` are left as asked."""
    if gpus > 0 and job.config.device == "auto":
        return replace(job, config=replace(job.config, device="cuda"))
    return job


def _start_ray(address: str | None) -> bool:
    """Connect to (``address``) or start a local Ray unless one is already up; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=True)
    return True
