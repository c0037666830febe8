"""The study's MLflow run: the parent of every arm's pre-training run and of the evaluation's runs, holding the
results table, the figures and the study's settings. Reopened when the study runs again (its id is kept in
``study.json``). As everywhere in the project, MLflow failing never stops the study: one warning, and the study
goes on without it (the arms still record their own runs, the results are in ``output_dir``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsebert.track.mlflow_store import MlflowStore, brief_error, short_http_retries, tracking_uri

KIND, STUDY = "sparsebert.kind", "sparsebert.study"


class StudyRun:
    """The study's parent run (``run_id`` None when MLflow could not be reached)."""

    def __init__(self, experiment: str, uri: str | None, name: str, run_id: str | None, tags: dict[str, Any]):
        short_http_retries()
        self.uri = tracking_uri(uri)
        self.error: str | None = None
        self.store: MlflowStore | None = self._guard("connecting", lambda: MlflowStore(experiment, uri))
        self.run_id = self._guard("opening the study's run", lambda: self._open(name, run_id, tags))

    def _open(self, name: str, run_id: str | None, tags: dict[str, Any]) -> str:
        if run_id and self._exists(run_id):
            self.store.reopen(run_id)
            return run_id
        return self.store.create_run(name, {**tags, KIND: "study", STUDY: name})

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.store.client.get_run(run_id)
        except MlflowException:
            return False  # recorded in another tracking store
        return run.info.experiment_id == self.store.experiment_id

    def log_files(self, root: Path, names: list[str]) -> None:
        """Files and directories under ``root``, at the same paths among the run's artifacts."""
        for name in names:
            path = root / name
            if path.is_dir():
                self._call(
                    "logging artifacts", lambda p=path, n=name: self.store.log_artifacts(self.run_id, p, n)
                )
            elif path.is_file():
                parent = str(Path(name).parent)
                self._call(
                    "logging artifacts",
                    lambda p=path, d=parent: self.store.log_artifact(self.run_id, p, d if d != "." else None),
                )

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._call("logging metrics", lambda: self.store.log_metrics(self.run_id, metrics))

    def end(self, status: str = "FINISHED") -> None:
        self._call("ending the study's run", lambda: self.store.end(self.run_id, status))

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        if self.run_id is None:
            return None
        return self._guard(what, call)

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        if self.error is not None:
            return None
        try:
            return call()
        except Exception as exc:  # whatever MLflow raises: the study goes on without it
            self.error = brief_error(exc)
            print(f"WARNING: MLflow failed ({what}: {self.error}); the study continues without its MLflow run "
                  "(the results are in its output_dir)", file=sys.stderr, flush=True)  # fmt: skip
            return None
