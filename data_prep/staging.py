"""Where a preparation is built before it is published, and how an interrupted one is resumed.

Everything is written to a hidden staging directory next to the output (``.NAME.partial``: the same filesystem,
so the final rename is atomic; a fixed name, so ``--resume`` finds it) and renamed into place only when complete:
a failed or interrupted run never leaves a half-written corpus behind. (For an object-store output the workers'
files go to a staging prefix in the store instead: ``data_prep.remote``.) A run that stops half-way keeps the
staging directory with its finished units; ``resume`` checks that the run is the same (settings, units, input
sizes and times, recorded in ``_units/run.json``), keeps the intact units and the tokenizer (its hash checked) and
redoes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.format import FORMAT_VERSION, TOKENIZER_DIR, tokenizer_hash
from data_prep.options import PrepOptions
from data_prep.remote import UNITS_DIR, SharedStaging
from data_prep.sources import Plan

logger = logging.getLogger("data_prep")


def staging_dir(output_dir: Path) -> Path:
    """The hidden directory a corpus for ``output_dir`` is built in."""
    return output_dir.with_name(f".{output_dir.name}.partial")


def run_identity(plan: Plan, validation: Plan | None, options: PrepOptions) -> dict[str, Any]:
    """What makes the output what it is: the settings, the units and the input files' sizes and times. A
    resumed run must have the same, or the units it keeps would not belong to its output."""
    units = plan.units + (validation.units if validation else [])
    files = sorted({path for unit in units for path in unit.paths})
    return {
        "format_version": FORMAT_VERSION,
        "settings": {s: options.recorded(s) for s in ("top", "config", "validation")}
        | {k: getattr(options, k) for k in ("tokenizer", "train_tokenizer", "vocab_size", "lowercase")},
        "units": [
            [u.kind, list(u.paths), u.start, u.stop, u.column, u.rows_per_document, u.split] for u in units
        ],
        "files": [[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in files],
    }


def open_staging(staging: Path, run: dict[str, Any], resume: bool, shared: SharedStaging) -> None:
    """Create the staging directory, or with ``resume`` reuse one left by the same run (checked). Starting over,
    what workers wrote in an object store for an earlier run goes too."""
    record = staging / UNITS_DIR / "run.json"
    if staging.exists() and resume:
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot resume from {staging}: no readable run record ({exc})") from exc
        differ = [key for key in run if previous.get(key) != json.loads(json.dumps(run[key]))]
        if differ:
            raise ValueError(
                f"cannot resume from {staging}: its {' and '.join(differ)} differ from this run's; run "
                "without --resume to start over"
            )
        logger.info("resuming the preparation kept in %s", staging)
        return
    if staging.exists():
        logger.warning("removing %s, an unfinished preparation (--resume would continue it)", staging)
        shutil.rmtree(staging)
    elif resume:
        logger.info("nothing to resume (no %s): preparing from the start", staging)
    shared.discard()
    (staging / UNITS_DIR).mkdir(parents=True)
    write_json(record, run)


def staged_tokenizer(staging: Path) -> dict[str, Any] | None:
    """The tokenizer an interrupted run left in ``staging``, if it is whole (its hash checked)."""
    try:
        info = json.loads((staging / UNITS_DIR / "tokenizer.json").read_text(encoding="utf-8"))
        if tokenizer_hash(staging / TOKENIZER_DIR) == info.pop("hash"):
            return info
    except (OSError, ValueError, KeyError):
        pass
    return None


def record_tokenizer(staging: Path, info: dict[str, Any]) -> None:
    """Remember the tokenizer prepared in ``staging`` (with its hash) for a resumed run."""
    write_json(
        staging / UNITS_DIR / "tokenizer.json", info | {"hash": tokenizer_hash(staging / TOKENIZER_DIR)}
    )


def publish(staging: Path, output_dir: Path) -> None:
    """Move the finished corpus into place (a rename: atomic on one filesystem)."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old)
    else:
        staging.rename(output_dir)


def discard(staging: Path, shared: SharedStaging) -> None:
    """Forget a run that cannot be resumed (its data or settings are wrong: a rerun meets them again)."""
    shutil.rmtree(staging, ignore_errors=True)
    _quietly(shared.discard)


def keep_for_resume(staging: Path, shared: SharedStaging, units: int) -> None:
    """What a stopped run leaves: its finished units for ``--resume`` (said in a warning), or nothing."""
    kept = _quietly(shared.finished_units) or 0
    if kept:
        logger.warning(
            "preparation stopped with %d of %d units finished, kept in %s: run the same command with "
            "--resume to redo only the rest",
            kept,
            units,
            shared.location,
        )
    else:
        discard(staging, shared)


def write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def _quietly(action: Callable[[], Any]) -> Any:
    """Clean-up on the way out of a failure: a second failure (the store unreachable) must not hide the first."""
    try:
        return action()
    except OSError as exc:
        logger.warning("could not clean up after the failure: %s", exc)
        return None
