"""A run's tracking records on local disk (:class:`RunLog`: ``output_dir/tracking/``) and their delivery to
MLflow (:class:`RunSync`, sent by a background thread, :class:`_Sender`): what lets training go on, and be
re-synced later, when the tracking server is down."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsebert.track.mlflow_store import MlflowStore

LOCAL_DIR = "tracking"  # a run's local records: output_dir/tracking/
LOCAL_ID_TAG = "sparsebert.local_run_id"  # the MLflow run's tag naming the local records it came from


class RunLog:
    """A run's tracking records on local disk (``output_dir/tracking/``), the copy MLflow is fed from.

    * ``records.jsonl``: one JSON object a line, in order, each with ``seq`` (0, 1, ...), ``time`` (seconds since
      the epoch) and ``kind``: ``start`` (experiment, run name, tracking URI, the run's local id), ``params``,
      ``metrics`` (with their ``step``), ``tags``, ``artifacts`` (files under ``artifacts/<path>/``) or ``end``
      (the status). A resumed training run appends to the same file, beginning with another ``start``.
    * ``artifacts/``: the artifact files, at their MLflow artifact paths.
    * ``sync.json``: per tracking URI, the MLflow run the records went to and the last ``seq`` it holds.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records_path = self.root / "records.jsonl"
        self.sync_path = self.root / "sync.json"
        self.artifacts = self.root / "artifacts"
        self._file = None
        self._next_seq = 0

    @classmethod
    def find(cls, path: str | Path) -> RunLog:
        """The records of a run's ``output_dir`` (or of the tracking directory itself)."""
        path = Path(path)
        return cls(path if (path / "records.jsonl").is_file() else path / LOCAL_DIR)

    def read(self) -> list[dict[str, Any]]:
        if not self.records_path.is_file():
            return []
        records = []
        with open(self.records_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed process, cut short
                if isinstance(record, dict) and "seq" in record:
                    records.append(record)
        return records

    def open(self) -> None:
        """Start appending, after the records already there."""
        self.root.mkdir(parents=True, exist_ok=True)
        records = self.read()
        self._next_seq = records[-1]["seq"] + 1 if records else 0
        torn = False
        if self.records_path.is_file() and self.records_path.stat().st_size:
            with open(self.records_path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.records_path, "a", encoding="utf-8")  # noqa: SIM115 - open while the run lasts
        if torn:
            self._file.write("\n")

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"seq": self._next_seq, "time": time.time(), "kind": kind, **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._next_seq += 1
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def store_files(self, path: str, source: Path) -> list[str]:
        """Move the files of ``source`` to ``artifacts/<path>/`` (each replaced whole: a reader never sees half a
        file); returns their names."""
        target = self.artifacts / path
        target.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in source.iterdir() if p.is_file())
        for name in names:
            os.replace(source / name, target / name)
        return names

    def sync_state(self, uri: str) -> dict[str, Any]:
        """``{"run_id": ..., "synced": last seq sent}`` for ``uri`` (empty when nothing was sent there)."""
        return dict(self._targets().get(uri, {}))

    def save_sync_state(self, uri: str, state: dict[str, Any]) -> None:
        targets = self._targets()
        targets[uri] = state
        tmp = self.sync_path.with_name(self.sync_path.name + ".tmp")
        tmp.write_text(json.dumps(targets, indent=1))
        os.replace(tmp, self.sync_path)

    def run_ids(self) -> set[str]:
        """Every id this run is known by: its local id and the MLflow runs its records went to."""
        ids = {r["local_id"] for r in self.read() if r["kind"] == "start"}
        return ids | {t["run_id"] for t in self._targets().values() if t.get("run_id")}

    def archive(self) -> Path:
        """Move the records aside (``tracking.<time>``), still there for ``sparsebert.track.resync``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = self.root.with_name(f"{self.root.name}.{stamp}"), 1
        while target.exists():
            target, n = self.root.with_name(f"{self.root.name}.{stamp}.{n}"), n + 1
        self.root.rename(target)
        return target

    def _targets(self) -> dict[str, Any]:
        return json.loads(self.sync_path.read_text()) if self.sync_path.is_file() else {}


class RunSync:
    """Sends a :class:`RunLog`'s records to one tracking store, in order, remembering in ``sync.json`` the MLflow
    run they go to and the last record it holds, so a record is sent once. The first ``start`` record creates
    the MLflow run (tagged with the run's local id), a later one reopens it; metrics keep their step and the
    time they were recorded, so a point sent twice (its answer lost) is still one point in a SQL-backed store."""

    def __init__(self, log: RunLog, uri: str, experiment: str):
        self.log, self.uri, self.experiment = log, uri, experiment
        self.state = log.sync_state(uri)
        self._store: MlflowStore | None = None

    @property
    def run_id(self) -> str | None:
        return self.state.get("run_id")

    def pending(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records this store does not hold yet."""
        synced = self.state.get("synced", -1)
        return [r for r in records if r["seq"] > synced]

    def send(self, records: list[dict[str, Any]]) -> None:
        for group in _groups(records):
            self._send(group)
            self.state["synced"] = group[-1]["seq"]
            self.log.save_sync_state(self.uri, self.state)

    @property
    def store(self) -> MlflowStore:
        if self._store is None:
            self._store = MlflowStore(self.experiment, self.uri)
        return self._store

    def _send(self, group: list[dict[str, Any]]) -> None:
        first, kind = group[0], group[0]["kind"]
        if kind == "start":
            if self.run_id is None:
                self.state["run_id"] = self.store.create_run(
                    first["run_name"], {LOCAL_ID_TAG: first["local_id"]}, start_time=first["time"]
                )
                self.log.save_sync_state(self.uri, self.state)
            else:
                self.store.reopen(self.run_id)
            return
        if self.run_id is None:
            raise RuntimeError(f"{self.log.records_path}: a {kind!r} record before any 'start' record")
        if kind == "metrics":
            points = [(k, v, r["step"], r["time"]) for r in group for k, v in r["metrics"].items()]
            self.store.log_metric_points(self.run_id, points)
        elif kind == "params":
            self.store.log_params(self.run_id, first["params"])
        elif kind == "tags":
            self.store.set_tags(self.run_id, first["tags"])
        elif kind == "artifacts":
            for name in first["files"]:
                self.store.log_artifact(self.run_id, self.log.artifacts / first["path"] / name, first["path"])
        elif kind == "end":
            self.store.end(self.run_id, first["status"], end_time=first["time"])
        else:
            raise ValueError(f"{self.log.records_path}: unknown record kind {kind!r}")


def _groups(records: list[dict[str, Any]], most: int = 100) -> list[list[dict[str, Any]]]:
    """Consecutive metrics records together (one request), every other record alone."""
    groups: list[list[dict[str, Any]]] = []
    for record in records:
        last = groups[-1] if groups else None
        if last and record["kind"] == "metrics" == last[-1]["kind"] and len(last) < most:
            last.append(record)
        else:
            groups.append([record])
    return groups


class _Sender:
    """The background thread that feeds a :class:`RunSync`, so the training loop only ever queues a record.

    After the first failure (reported once through ``on_error``) records are only kept locally, for a resync.
    A daemon thread: it never keeps the process alive; whoever needs the records sent waits (bounded) for it.
    """

    def __init__(self, sync: RunSync, on_error: Callable[[BaseException], None]):
        self.sync, self.on_error = sync, on_error
        self.error: BaseException | None = None
        self.queued = self.handled = self.unsent = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sparsebert-tracking", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._queue.append(record)
            self.queued += 1
            self._cond.notify_all()

    def idle(self) -> bool:
        return self.handled >= self.queued

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` (checked under the lock) or ``timeout`` seconds; returns ``done()``."""
        with self._cond:
            return self._cond.wait_for(done, timeout)

    def close(self) -> None:
        """The thread ends once the queue is empty (at once when nothing is in flight)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), 100))]
                failed = self.error is not None
            if not failed:
                try:
                    self.sync.send(batch)
                except Exception as exc:  # whatever MLflow raises, the records stay local
                    failed = True
                    with self._cond:
                        self.error = exc
                    self.on_error(exc)
            with self._cond:
                self.handled += len(batch)
                self.unsent += len(batch) if failed else 0
                self._cond.notify_all()
