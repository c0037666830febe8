"""A corpus prepared into object storage (``--output s3://...`` or ``gs://...``): where the workers of a run meet.

The driver keeps its own files (the run's record, the tokenizer it prepared, the manifest) in a local staging
directory keyed by the output's URI (``$SPARSEBERT_CACHE/data_prep/...``). What workers write and other workers
read (the tokenizer they load, each unit's sample files and record, the shards) goes to a staging prefix in the
store next to the output, ``.NAME.partial/``: Ray workers on any node meet there, so no filesystem needs to be
shared (each node reaches the store with the variables, config files or role of its own environment).
Publishing copies the shards into the output inside the store (nothing passes through the driver), uploads the
tokenizer, and writes ``manifest.json`` last, so a reader finds a whole corpus or none; the staging prefix is
then deleted. With a local output, the shared staging is the local staging directory itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from data_prep.format import MANIFEST_NAME, TOKENIZER_DIR
from sparsebert import storage

UNITS_DIR = "_units"  # in the staging directory: unit files, their records, the run's record


def build_dir(target: storage.Location, overwrite: bool) -> Path:
    """Where the driver builds the corpus: the output itself, or for an object-store output a local directory
    keyed by its URI (the driver's files; :meth:`SharedStaging.publish` follows). Refuses an output that holds
    something, unless ``overwrite``."""
    if target.remote:
        if "/" not in target.path:
            raise ValueError(f"{target}: give a path inside the bucket, not the bucket itself")
        if target.files() and not overwrite:
            raise FileExistsError(f"{target} is not empty; use overwrite=True (--overwrite)")
        local = storage.local_mirror(target, "data_prep").resolve()
        shutil.rmtree(local, ignore_errors=True)  # a build whose upload did not finish: built again
        return local
    output_dir = Path(target.path).expanduser().resolve()
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise FileExistsError(
            f"{output_dir} exists and is not an empty directory; use overwrite=True (--overwrite)"
        )
    return output_dir


class SharedStaging:
    """What the workers of a run read and write: ``location``, the local staging directory or, for an output in
    an object store, a prefix next to it."""

    def __init__(self, target: storage.Location, local_staging: Path) -> None:
        self.target = target
        if target.remote:  # a path inside the bucket (data_prep refuses the bucket itself as an output)
            parent, _, name = target.path.rpartition("/")
            self.location = storage.Location(target.scheme, f"{parent}/.{name}.partial")
        else:
            self.location = storage.Location("", str(local_staging))

    @property
    def remote(self) -> bool:
        return self.location.remote

    @property
    def units(self) -> str:
        """Where the workers write the units' files and records (a path or a URI)."""
        return (self.location / UNITS_DIR).uri

    def tokenizer(self, local: Path) -> str:
        """Where the workers load the tokenizer prepared in ``local``: there, or a copy in the store."""
        if not self.remote:
            return str(local)
        storage.upload(local, self.location / TOKENIZER_DIR)
        return (self.location / TOKENIZER_DIR).uri

    def finished_units(self) -> int:
        """How many units have a record (what a stopped run keeps for ``--resume``)."""
        if not self.remote:
            units = Path(self.location.path) / UNITS_DIR
            return len(list(units.glob("unit-*.json"))) if units.is_dir() else 0
        names = (self.location / UNITS_DIR).files()
        return sum(1 for n in names if n.startswith("unit-") and n.endswith(".json"))

    def clear_units(self) -> None:
        """Forget every unit (another tokenizer, or another run): in the store; locally, the unit files."""
        if self.remote:
            (self.location / UNITS_DIR).delete()
        else:
            for finished in (Path(self.location.path) / UNITS_DIR).glob("unit-*"):
                finished.unlink()

    def discard(self) -> None:
        """Delete what the workers wrote in the store (the local staging directory is the driver's to delete)."""
        if self.remote:
            self.location.delete()

    def publish(self, built: Path, overwrite: bool) -> None:
        """Make the output in the store the corpus whose driver files are in ``built`` and whose shards are in the
        staging prefix: shards copied within the store, the tokenizer uploaded, ``manifest.json`` last. With
        ``overwrite``, an earlier corpus there loses its manifest first (readers see no corpus rather than a
        mix), then the files the new one does not have."""
        target = self.target
        shards = [n for n in self.location.files() if n.endswith(".parquet") and not n.startswith(UNITS_DIR)]
        local = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
        if overwrite:
            (target / MANIFEST_NAME).delete()
            for stale in sorted(set(target.files()) - set(shards) - set(local)):
                (target / stale).delete()
        storage.parallel(lambda name: storage.copy(self.location / name, target / name), shards)
        storage.upload(built, target, last=[MANIFEST_NAME])
        self.discard()
