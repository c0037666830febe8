"""Where a study's files live: its ``output_dir``, a local directory (a shared filesystem on a cluster) or a prefix
in object storage.

``output_dir/`` holds ``study.json`` (the state: what each arm is, where, how far), ``arms/<arm>/`` (each arm's
pre-training ``output_dir``: checkpoints, ``final/``, ``tracking/``), ``eval/`` (the evaluation's output),
``tasks/`` (data the study writes for its corpus tasks), the results and ``figures/``. In object storage the arms
write straight to the store (the trainer stages them itself); the study works in a local mirror of the prefix
(``$SPARSEBERT_CACHE/studies/<host>/...``), fetches what it reads of the arms (``final/``, the tracking
artifacts) and uploads its own files.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from sparsebert import storage
from sparsebert.schema import ConfigError

STATE = "study.json"
FINAL_MARKER = "config.json"  # what an export writes last: a final/ with it is complete
LOCK = ".study.lock"


class StudyPlace:
    """A study's ``output_dir``: ``location`` (as given) and ``local`` (itself, or its mirror)."""

    def __init__(self, output_dir: str) -> None:
        try:
            self.location = storage.parse(output_dir, "config key 'output_dir'")
        except storage.UnsupportedLocation as err:
            raise ConfigError(str(err)) from None
        self.local = storage.local_mirror(self.location, "studies", per_host=True)
        self._lock = None

    @property
    def remote(self) -> bool:
        return self.location.remote

    def where(self, *parts: str) -> str:
        """A path or URI inside ``output_dir``, as a run's ``output_dir`` key takes it."""
        location = self.location
        for part in parts:
            location = location / part
        return location.uri

    def arm_dir(self, dirname: str) -> str:
        return self.where("arms", dirname)

    def finished(self, dirname: str) -> bool:
        """Whether the arm's pre-training exported its model (its ``final/`` is complete)."""
        return (self.location / "arms" / dirname / "final" / FINAL_MARKER).is_file()

    def started(self, dirname: str) -> bool:
        return (self.location / "arms" / dirname).exists()

    def saved_config(self, dirname: str) -> dict[str, Any] | None:
        """The training config the arm's newest checkpoint was written with (None before its first)."""
        root = self.location / "arms" / dirname / "checkpoints"
        latest = root / "latest"
        if not latest.is_file():
            return None
        config = root / latest.read_text().strip() / "train_config.json"
        return json.loads(config.read_text()) if config.is_file() else None

    def lock(self) -> None:
        """Hold the study for this process (two drivers of one study would launch the same arm twice)."""
        self.local.mkdir(parents=True, exist_ok=True)
        handle = open(self.local / LOCK, "w")  # noqa: SIM115 - held while the process lives
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"study {self.location.uri} is being run by another process on this machine"
            ) from None
        self._lock = handle

    def read_state(self) -> dict[str, Any]:
        """``study.json``, or an empty state for a new study; a corrupt one is an error naming it."""
        path = self.location / STATE
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{path.uri} is not the study's state ({err}); move it aside to start afresh"
            ) from None
        if not isinstance(state, dict):
            raise ConfigError(
                f"{path.uri} is not the study's state (not a mapping); move it aside to start afresh"
            )
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        """``study.json``, replaced whole (and uploaded: the store is the truth)."""
        self.write_text(STATE, json.dumps(state, indent=1, sort_keys=True))

    def write_text(self, name: str, text: str) -> Path:
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
        if self.remote:
            storage.upload(path, self.location / name)
        return path

    def publish(self, name: str) -> None:
        """Upload the local file or directory ``name`` (nothing to do for a local ``output_dir``)."""
        if self.remote and (self.local / name).exists():
            storage.upload(self.local / name, self.location / name)

    def final(self, dirname: str) -> Path:
        """The arm's exported model as a local directory (fetched once from a store)."""
        local = self.local / "arms" / dirname / "final"
        if self.remote and not (local / FINAL_MARKER).is_file():
            storage.download(self.location / "arms" / dirname / "final", local)
        return local

    def tracking(self, dirname: str) -> Path:
        """The arm's tracking artifacts (masks, importance snapshots) as a local directory."""
        local = self.local / "arms" / dirname / "tracking" / "artifacts"
        if self.remote:
            source = self.location / "arms" / dirname / "tracking" / "artifacts"
            storage.download(source, local, keep=lambda name: name.startswith(("masks/", "importance/")))
        return local
