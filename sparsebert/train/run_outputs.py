"""A run's ``output_dir`` in object storage (``s3://``, ``gs://``): the node-local staging directory the run works
in, and what moves between it and the store. With a local ``output_dir`` nothing moves: ``local`` is the
directory itself and every method returns at once.

The staging directory is ``$SPARSEBERT_CACHE/outputs/<host>/<scheme>/<bucket>/<path>`` (one per machine, also where
the cache sits on a shared home directory). The ranks of a machine share it: DeepSpeed writes their parts of a
checkpoint there as it would into a local ``output_dir``. The store is the truth; a starting run rebuilds the
staging directory from it, so nodes need no shared filesystem and a run may resume on other machines.

* **Start** (:meth:`RunOutputs.open`): rank 0 takes the lease (:mod:`sparsebert.train.output_lease`); each machine's
  first rank (``LOCAL_RANK`` 0) empties its ``checkpoints/``, and rank 0 fills its own with the store's index
  (``latest`` and every tag's ``train_state.json`` and ``train_config.json``), so ``checkpoint.resume_point``
  reads it as it reads a local ``output_dir`` (on rank 0 only: the trainer hands its answer to every rank);
  rank 0 takes the tracking journal (``tracking/``), each rank its sample log.
* **Resume** (:meth:`fetch`): of the tag rank 0 chose, each machine's first rank downloads the files every rank
  reads (the model states), each rank its own (``rng_rank<r>.pt``, ``*zero_pp_rank_<r>_*``).
* **Set-up** (start and resume) runs inside ``agreement.all_or_none``: an error is raised on the rank it happens
  on, which stops every rank; later transfers agree through a vote (:func:`_together`).
* **Checkpoint** (:meth:`push_checkpoint`, once ``checkpoint.save`` wrote it locally): each machine's first rank
  uploads the parts its ranks wrote; once every machine is done (an agreement that also carries a failure, so no
  rank waits for a dead one), rank 0 uploads ``train_state.json`` (what makes a tag complete), then ``latest``,
  prunes the store's tags as ``checkpoint.keep_last`` says and uploads the journal; each rank uploads its own
  files (masks, sample log); each machine deletes its local copy of the tag.
* **End** (:meth:`push_final`, :meth:`close`): ``final/`` with ``config.json`` last (an earlier ``final/`` loses
  its ``config.json`` first, so a reader never loads a mix), the journal and the rank files; the lease is
  released.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from sparsebert import storage
from sparsebert.track.run_log import LOCAL_DIR
from sparsebert.train import checkpoint
from sparsebert.train import distributed as ds_setup
from sparsebert.train.config import ConfigError
from sparsebert.train.output_lease import Lease
from sparsebert.train.run_report import report

# A checkpoint file of one rank: our RNG state, DeepSpeed's ZeRO partitions (optimizer; model too under ZeRO-3).
_OWNED = re.compile(r"(?:rng_rank|zero_pp_rank_)(\d+)")
_INDEX = (checkpoint.TRAIN_STATE, checkpoint.TRAIN_CONFIG)
FINAL_MARKER = "config.json"  # what from_pretrained reads first


class RunOutputs:
    """``output_dir`` of a run: ``local`` (where the run writes) and, for a URI, its ``location`` in a store."""

    def __init__(self, output_dir: str) -> None:
        self.location = storage.parse(output_dir, "config key 'output_dir'")
        self.remote = self.location.remote
        self.local = storage.local_mirror(self.location, "outputs", per_host=True)
        self.lease: Lease | None = None

    def where(self, *parts: str) -> str:
        """``output_dir/parts`` as messages show it: its URI, or the local path."""
        if not self.remote:
            return str(self.local.joinpath(*parts).resolve())
        location = self.location
        for part in parts:
            location = location / part
        return location.uri

    # --- start --------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Take the lease (rank 0) and rebuild the staging directory from the store (every rank calls it)."""
        if not self.remote:
            return
        if ds_setup.rank() == 0:
            lease = Lease(self.location, report=report)
            try:
                lease.acquire()
            except (RuntimeError, ValueError) as exc:  # held by another run; a bad SPARSEBERT_LEASE_SECONDS
                raise ConfigError(str(exc)) from None
            self.lease = lease
            atexit.register(lease.release)  # however the process ends, short of being killed
        _in_setup(f"reading {self.location}", self._pull)

    def _pull(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        root = checkpoint.checkpoint_dir(self.local)
        if _first_on_machine():  # what an earlier run left on this machine
            shutil.rmtree(root, ignore_errors=True)
        if ds_setup.rank() == 0:  # the index, which rank 0 alone reads (the trainer's resume point)
            storage.download(self.location / "checkpoints", root, keep=_index_file)
            shutil.rmtree(self.local / LOCAL_DIR, ignore_errors=True)
            storage.download(self.location / LOCAL_DIR, self.local / LOCAL_DIR)
        samples = samples_log(ds_setup.rank())
        (self.local / samples).unlink(missing_ok=True)
        storage.download_file(self.location / samples, self.local / samples)

    def fetch(self, tag: str) -> None:
        """Download what this machine's ranks read of checkpoint ``tag`` (every rank calls it, with the tag rank 0
        chose)."""
        if not self.remote:
            return
        rank, first = ds_setup.rank(), _first_on_machine()

        def wanted(name: str) -> bool:
            owner = _owner(name)
            return owner == rank or (owner is None and first and name not in _INDEX)

        local = checkpoint.checkpoint_dir(self.local) / tag
        source = self.location / "checkpoints" / tag
        _in_setup(
            f"downloading checkpoint {tag} from {self.location}",
            lambda: storage.download(source, local, keep=wanted),
        )

    def delete_tags(self, tags: list[str]) -> None:
        """Delete checkpoints from the store too (those ``checkpoint.check_resume`` discarded locally)."""
        if self.remote and tags:
            root = self.location / "checkpoints"
            _in_setup(
                f"deleting checkpoints from {self.location}",
                lambda: [(root / tag).delete() for tag in tags],
                on=ds_setup.rank() == 0,
            )

    # --- checkpoints ------------------------------------------------------------------------------------

    def push_checkpoint(self, tag: str, keep_last: int) -> None:
        """Upload checkpoint ``tag`` (written locally by ``checkpoint.save``); ``latest`` moves only once every
        part of it is in the store (every rank calls it)."""
        if not self.remote:
            return
        local = checkpoint.checkpoint_dir(self.local) / tag
        what = f"uploading checkpoint {tag} to {self.location}"
        parts = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()] if local.is_dir() else []
        parts = [name for name in parts if name != checkpoint.TRAIN_STATE]
        remote = self.location / "checkpoints" / tag
        _together(what, lambda: storage.upload(local, remote, only=parts), on=_first_on_machine())
        lost = self.lease is not None and not self.lease.held()
        if ds_setup.any_rank(lost):
            taker = self.lease.lost_to() if self.lease is not None else "another training run"
            raise RuntimeError(
                f"{self.location} was taken over by {taker}; this run stops without publishing checkpoint {tag}"
            )
        _together(what, lambda: self._publish(tag, keep_last), on=ds_setup.rank() == 0)
        _together(what, self._push_rank_files)
        if _first_on_machine():
            shutil.rmtree(
                local, ignore_errors=True
            )  # in the store now; the machine's disk holds one at a time

    def _publish(self, tag: str, keep_last: int) -> None:
        root = self.location / "checkpoints"
        storage.upload(
            checkpoint.checkpoint_dir(self.local) / tag / checkpoint.TRAIN_STATE,
            root / tag / checkpoint.TRAIN_STATE,
        )
        (root / checkpoint.LATEST).write_text(tag)
        files = root.files()
        tags = sorted({name.split("/")[0] for name in files if name.startswith("step") and "/" in name})
        complete = {name.split("/")[0] for name in files if name.endswith("/" + checkpoint.TRAIN_STATE)}
        for old in checkpoint.prunable(tags, complete, keep=keep_last, current=tag):
            (root / old).delete()
        self._push_journal()

    # --- end ----------------------------------------------------------------------------------------------

    def push_final(self, final: Path) -> None:
        """Upload the exported model (rank 0 wrote it; every rank calls this)."""
        if self.remote:
            _together(
                f"uploading {final.name}/ to {self.location}",
                lambda: storage.publish(final, self.location / final.name, FINAL_MARKER, replace=True),
                on=ds_setup.rank() == 0,
            )

    def close(self, *, together: bool = True) -> None:
        """Upload the journal and the rank files, release the lease. ``together=False`` on the way out of a
        failure: no agreement between ranks (another may be gone), each does its part as it can."""
        if not self.remote:
            return

        def push() -> None:
            if ds_setup.rank() == 0:
                self._push_journal()
            self._push_rank_files()

        if together:
            _together(f"uploading the run's records to {self.location}", push)
        else:
            try:
                push()
            except OSError as exc:
                print(f"warning: could not upload the run's records to {self.location}: {exc}", flush=True)
        if self.lease is not None:
            self.lease.release()

    def _push_journal(self) -> None:
        """The tracking journal (and journals of earlier runs moved aside): every file replaced whole, then what
        the store holds and the journal no longer has removed."""
        for journal in sorted(self.local.glob(f"{LOCAL_DIR}*")):
            if journal.is_dir():
                target = self.location / journal.name
                storage.upload(journal, target)
                ours = {str(p.relative_to(journal)) for p in journal.rglob("*") if p.is_file()}
                for stale in set(target.files()) - ours:
                    (target / stale).delete()

    def _push_rank_files(self) -> None:
        rank = ds_setup.rank()
        masks = (f"masks/{p.name}" for p in (self.local / "masks").glob(f"*.rank{rank}.*"))
        for name in [samples_log(rank), *masks]:
            if (self.local / name).is_file():
                storage.upload(self.local / name, self.location / name)


def _in_setup(what: str, action: Callable[[], object], on: bool = True) -> None:
    """Run ``action`` where ``on``, then wait for every rank: during set-up, inside ``agreement.all_or_none``,
    whose watchdog stops every other rank when one raises. No vote (as :func:`_together` takes): every rank would
    raise, and the error reported could be another rank's echo instead of the one that happened."""
    if on:
        try:
            action()
        except Exception as exc:  # the store (StorageError), the local disk
            raise storage.StorageError(f"{what}: {exc}") from exc
    ds_setup.barrier()


def _together(what: str, action: Callable[[], object], on: bool = True) -> None:
    """Run ``action`` where ``on``; then every rank learns whether it failed anywhere, and all raise alike (an
    agreement, also a barrier: no rank waits for one that failed)."""
    error = None
    if on:
        try:
            action()
        except Exception as exc:  # the store (StorageError), the local disk: raised on every rank below
            error = exc
    if ds_setup.any_rank(error is not None):
        if error is not None:
            raise storage.StorageError(f"{what}: {error}") from error
        raise storage.StorageError(f"{what}: failed on another rank (its output has the error)")


def _first_on_machine() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _owner(name: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for files every rank reads."""
    found = _OWNED.search(Path(name).name)
    return int(found.group(1)) if found else None


def _index_file(name: str) -> bool:
    """``latest``, and the small files that describe a tag (what resume decisions read)."""
    return name == checkpoint.LATEST or (name.count("/") == 1 and name.split("/")[1] in _INDEX)


def samples_log(rank: int) -> str:
    """A rank's log of the samples of each step (``data.log_sample_ids``), relative to ``output_dir``."""
    return f"samples.rank{rank}.jsonl"
