"""Pre-training's MLflow run on rank 0 (:class:`RunTracker`), over the project's MLflow layer
(:mod:`sparsebert.track.mlflow_store`).

Tracking never stops training: :class:`RunTracker` writes every record to the run's ``output_dir/tracking/``
first (:class:`~sparsebert.track.run_log.RunLog`) and a background thread sends it to MLflow; when MLflow cannot be
reached the run goes on, and ``python -m sparsebert.track.resync OUTPUT_DIR`` sends the records later.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from sparsebert.track import importance_snapshots as importance_summary
from sparsebert.track import mask_plots
from sparsebert.track.mlflow_store import brief_error, short_http_retries, tracking_uri
from sparsebert.track.run_log import LOCAL_DIR, RunLog, RunSync, _Sender


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "attention_pattern":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class RunTracker:
    """One MLflow run per training run; a resumed training run continues the same MLflow run.

    Tracking never stops training: every record (params, metrics with their step, tags, artifact files) is first
    written to ``output_dir/tracking/`` (:class:`RunLog`), then sent to MLflow by a background thread, so the
    training loop never waits on the tracking server. When MLflow cannot be reached, at start or later, training
    goes on, one warning says so, and ``python -m sparsebert.track.resync OUTPUT_DIR`` sends the records afterwards.
    :meth:`start` waits up to ``start_wait`` seconds for the MLflow run to exist (so :attr:`run_id` is its id);
    :meth:`end` waits up to ``end_wait`` seconds for the thread to send what is queued.

    ``output_dir`` (the constructor's or :meth:`start`'s) defaults to the ``output_dir`` entry of the params
    given to :meth:`start`, which the flattened training config has. On ranks other than 0 (or with
    ``mlflow.enabled: false``) every method does nothing, so the train loop needs no ``if rank == 0``.
    """

    def __init__(
        self,
        enabled: bool,
        output_dir: str | Path | None = None,
        *,
        start_wait: float = 10.0,
        end_wait: float = 60.0,
    ):
        self.enabled = enabled
        self.output_dir = output_dir
        self.start_wait, self.end_wait = start_wait, end_wait
        self.local_id: str | None = None
        self.log: RunLog | None = None
        self._sync: RunSync | None = None
        self._sender: _Sender | None = None
        self._monitor = None  # MLflow's system metrics (CPU, memory, GPU) of this process's machine

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id; until MLflow has created the run (or if it could not), the run's local id
        (``local-…``), by which ``sparsebert.track.resync`` and the MLflow tag ``sparsebert.local_run_id`` know it."""
        if self._sync is None:
            return None
        return self._sync.run_id or self.local_id

    def start(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        resume_run_id: str | None,
        params: dict[str, Any],
        output_dir: str | Path | None = None,
    ) -> None:
        if not self.enabled:
            return
        out = output_dir or self.output_dir or params.get("output_dir")
        if not out:
            raise ValueError("RunTracker needs the run's output_dir (a constructor or start() argument)")
        short_http_retries()
        uri = tracking_uri(uri)
        log = RunLog(Path(out) / LOCAL_DIR)
        records = log.read()
        if records and not (resume_run_id and resume_run_id in log.run_ids()):
            log.archive()  # the records of an earlier run in this output_dir: this is another one
            records = []
        starts = [r["local_id"] for r in records if r["kind"] == "start"]
        self.local_id = starts[0] if starts else f"local-{uuid.uuid4().hex}"
        log.open()
        sync = RunSync(log, uri, experiment)
        if resume_run_id and not records and not resume_run_id.startswith("local-"):
            sync.state = {"run_id": resume_run_id, "synced": -1}  # a run begun before runs kept local records
            log.save_sync_state(uri, sync.state)
        self.log, self._sync = log, sync
        self._sender = _Sender(sync, self._offline)
        for record in sync.pending(records):  # what an earlier process of this run could not send
            self._sender.put(record)
        resumed = bool(records or resume_run_id)
        self._record("start", local_id=self.local_id, experiment=experiment, run_name=run_name, uri=uri)
        if not resumed:
            self._record("params", params={k: str(v) for k, v in params.items()})
        atexit.register(self._at_exit)
        sender = self._sender
        sender.wait(lambda: sync.run_id is not None or sender.error is not None, self.start_wait)
        if sync.run_id is not None and sender.error is None:
            self._monitor = _system_metrics(sync.run_id, uri, resumed)

    def log_configs(self, config: dict[str, Any], ds: dict[str, Any]) -> None:
        if self._sender is None:
            return
        with tempfile.TemporaryDirectory(dir=self.log.root) as tmp:
            (Path(tmp) / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (Path(tmp) / "deepspeed.json").write_text(json.dumps(ds, indent=2))
            self._artifacts("config", Path(tmp))

    def log_params(self, params: dict[str, Any]) -> None:
        if self._sender is not None:
            self._record("params", params={k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._sender is not None:
            self._record("metrics", step=int(step), metrics={k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._sender is not None:
            self._record("tags", tags={k: str(v) for k, v in tags.items()})

    def log_mask(self, name: str, mask: torch.Tensor, importance: torch.Tensor | None = None) -> None:
        """The mask ``[layers, heads, L, L]`` as a safetensors file and heatmaps; DAM importance plots too."""
        if self._sender is None:
            return
        mask = mask.cpu()  # files and plots are made on the host, whatever device the model runs on
        importance = importance.cpu() if importance is not None else None
        with tempfile.TemporaryDirectory(dir=self.log.root) as tmp:
            out = Path(tmp)
            tensors = {"mask": mask.to(torch.uint8).contiguous()}
            if importance is not None:
                tensors["importance"] = importance.float().contiguous()
            save_file(tensors, out / "mask.safetensors")
            mask_plots.mask_figures(name, mask, importance, out)
            self._artifacts(f"masks/{name}", out)

    def log_importance(self, importance: torch.Tensor, step: int) -> None:
        """A snapshot of DAM's σ(α) ``[layers, heads, L, L]`` during the search: its profile by distance as an
        artifact (``importance/step_<step>.safetensors``) and its bands as metrics (:mod:`.importance_snapshots`)."""
        if self._sender is None:
            return
        profile = importance_summary.by_distance(importance).contiguous()
        bands = importance_summary.bands(profile)
        with tempfile.TemporaryDirectory(dir=self.log.root) as tmp:
            save_file({"profile": profile}, Path(tmp) / importance_summary.snapshot_name(step))
            self._artifacts(importance_summary.SNAPSHOT_DIR, Path(tmp))
        self.log_metrics({f"importance/{name}": float(value.mean()) for name, value in bands.items()}, step)

    def end(self, status: str = "FINISHED") -> None:
        """Record the end and wait (at most ``end_wait`` seconds) for the records to reach MLflow."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self._sender is not None:
            self._record("end", status=status)
            self._close(self.end_wait)

    # --- internals -----------------------------------------------------------------------------------------

    def _record(self, kind: str, **fields: Any) -> None:
        self._sender.put(self.log.append(kind, **fields))

    def _artifacts(self, path: str, source: Path) -> None:
        self._record("artifacts", path=path, files=self.log.store_files(path, source))

    def _resync_command(self) -> str:
        return f"python -m sparsebert.track.resync {self.log.root.parent}"

    def _offline(self, exc: BaseException) -> None:
        """The one warning (from the sending thread, at the first failure)."""
        error = brief_error(exc)
        print(
            f"WARNING: MLflow tracking failed ({self._sync.uri}: {error}). Training continues; every record of "
            f"this run is kept in {self.log.root}. Send them to MLflow afterwards: {self._resync_command()}",
            file=sys.stderr,
            flush=True,
        )

    def _close(self, wait: float) -> None:
        sender = self._sender
        caught_up = sender.wait(sender.idle, wait)
        atexit.unregister(self._at_exit)
        sender.close()
        self.log.close()
        self._sender = None
        if not caught_up and sender.error is None:  # (a failure was reported when it happened)
            print(
                f"WARNING: MLflow did not take this run's last {sender.queued - sender.handled} tracking records "
                f"within {wait:g} s; they are kept in {self.log.root}. Send them: {self._resync_command()}",
                file=sys.stderr,
                flush=True,
            )

    def _at_exit(self) -> None:
        """A process ending without :meth:`end` (an error) still sends what it can, briefly."""
        if self._sender is not None:
            self._close(min(self.end_wait, 10.0))


def _system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's own system-metrics monitor (CPU, memory, disk, network; GPU where pynvml is installed) on the run,
    or None where it cannot start: it is a view of the machine, never a reason to stop training."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # a missing psutil, an old MLflow, a store that refuses: training goes on
        print(f"note: MLflow system metrics are off ({brief_error(exc)})", file=sys.stderr, flush=True)
        return None
