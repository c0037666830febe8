"""``prepare_corpus``: text in, tokenizer + fixed-size Parquet shards + manifest out, in parallel on Ray.

Flow (driver → Ray tasks → driver)::

    plan units (driver: file sizes, Parquet footers, hub shard lists; validation inputs too)
    tokenizer: copy the given one, or train on a seeded sample of the training documents (driver)
    stage 1  one Ray task per unit: read → sentences → token ids → samples → unit file per split + record
    stage 2  one Ray task per shard: row ranges of unit files → shard-NNNNN.parquet
             (validation/shard-NNNNN.parquet for the validation split)
    manifest.json, then rename the staging directory into place

A validation split (``validation_fraction`` or ``validation_inputs``) is made of whole documents that no
training sample (nor the trained tokenizer) saw; the manifest's ``validation`` section describes it. A
run without one writes exactly what it wrote before the option existed.

Everything is written to a hidden staging directory next to the output (``.NAME.partial``) and renamed
into place only when complete, so a failed or interrupted run never leaves a half-written corpus behind. For
an ``s3://`` / ``gs://`` output the workers' files go to a staging prefix in the store instead, and publishing
copies them into place with ``manifest.json`` last (``data_prep.remote``): a reader finds a whole corpus or none.
A task that fails transiently is retried by Ray (``data_prep.failures``). A run that stops half-way keeps
the staging directory with its finished units, each recorded with the SHA-256 of its files; ``resume``
checks that the run is the same (settings, units, input sizes and times), keeps the intact units and
redoes the rest, which gives the same output since a unit's output depends on nothing else.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep import tokenizer as tokenization
from data_prep.failures import RETRIES, TransientError, inject_driver_kill
from data_prep.format import (
    FORMAT_VERSION,
    TOKENIZER_DIR,
    VALIDATION_DIR,
    shard_schema,
    tokenizer_hash,
    write_manifest,
)
from data_prep.options import PrepOptions
from data_prep.remote import UNITS_DIR, SharedStaging, build_dir
from data_prep.shards import plan_shards, write_shard
from data_prep.sources import Plan, ReadCounters, Unit, plan_units, read_documents
from data_prep.units import HELD_OUT_RULE, BuildConfig, build_unit, finished_unit, held_out, unit_file
from sparsebert import storage

logger = logging.getLogger("data_prep")
MIN_SAMPLES_FOR_BALANCE = 200  # below this, the random-next share is too noisy to warn about
# One-sentence chunks can only give a random next: on well-split text they are 10-20% of the samples
# (the ends of documents, long sentences), on text split too coarsely 40% and more.
MAX_SINGLE_SEGMENT_SHARE = 0.3
_TOTALS = ("documents", "sentences", "tokens", "samples", "sample_tokens", "nsp_random_next")


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


def _run_tasks(
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
    finished = 0
    try:
        while True:
            while len(pending) < limit and (nxt := next(queue, None)) is not None:
                pending[task.remote(nxt[1], **shared)] = nxt[0]
            if not pending:
                break
            [ready], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready)
            try:
                results[index] = ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise RuntimeError(
                    f"{what}: task {index} failed {RETRIES + 1} times, last with {type(cause).__name__}: {cause}"
                ) from None
            except ray.exceptions.RayError as exc:  # a worker or node lost more often than Ray retries
                raise RuntimeError(f"{what}: task {index} failed {RETRIES + 1} times: {exc}") from None
            bar.update()
            finished += 1
            if on_done is not None:
                on_done(finished)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    for result in results:
        if "error" in result:
            error = getattr(builtins, result["error"], None)
            error = error if isinstance(error, type) and issubclass(error, Exception) else RuntimeError
            raise error(result["message"])
    return results


def _training_texts(
    plan: Plan, *, seed: int, budget: int, max_line_length: int, validation_fraction: float = 0.0
) -> list[str]:
    """Documents for tokenizer training: whole units in a seeded random order, up to ``budget`` chars;
    documents held out for validation are left out."""
    order = list(range(len(plan.units)))
    random.Random(seed).shuffle(order)
    texts, used = [], 0
    for index in order:
        unit = plan.units[index]
        try:
            for document in read_documents(unit, max_line_length=max_line_length, counters=ReadCounters()):
                if held_out(document, seed, validation_fraction):
                    continue
                texts.append(document)
                used += len(document)
                if used >= budget:
                    return texts
        except (OSError, pa.ArrowException) as exc:  # stage 1 meets it again and records the skip
            if unit.kind == "hf":
                raise
            logger.warning("tokenizer training skips unreadable %s: %s", unit.paths, exc)
    return texts


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished corpus into place (a rename: atomic on one filesystem)."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old)
    else:
        staging.rename(output_dir)


def prepare_corpus(
    inputs: Sequence[str | Path], output_dir: str | Path, options: PrepOptions | None = None, **settings: Any
) -> dict[str, Any]:
    """Prepare a pre-training corpus; returns the manifest (also written to ``output_dir/manifest.json``).

    ``inputs`` are files (.txt, .jsonl, .parquet), directories or globs. ``options`` holds every setting
    (``PrepOptions``: hub datasets, tokenizer, sample shape, parallelism...); keyword ``settings`` are
    fields of it, for short calls (``prepare_corpus(paths, out, seq_len=512)``), and override ``options``.
    The output is identical for the same inputs and options whatever ``num_workers`` is.
    Ray: reuses a running Ray; otherwise starts one (``ray_address`` to join a cluster) and stops it.
    """
    options = PrepOptions(**settings) if options is None else replace(options, **settings)
    started = time.perf_counter()
    target = storage.parse(output_dir, "output_dir")
    output_dir = build_dir(target, options.overwrite)
    names = [str(i) for i in inputs] + [s.name for s in options.hf_datasets]
    if not names:
        raise ValueError("nothing to prepare: give input paths and/or a Hugging Face dataset")
    plan = _plan(inputs, options.hf_datasets, options)
    if not plan.units:
        raise ValueError(f"empty corpus: nothing readable in {names}; skipped: {plan.skipped_files}")
    logger.info("%d units of work from %d sources", len(plan.units), len(plan.sources))
    validation = _plan_validation(plan, options)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, next to the output: same filesystem, so the final rename is atomic. Its name is fixed, so
    # that --resume finds what an interrupted run finished.
    staging = output_dir.with_name(f".{output_dir.name}.partial")
    shared = SharedStaging(
        target, staging
    )  # what workers write: the staging directory, or a prefix in the store
    units_dir = staging / UNITS_DIR
    run = _run_identity(plan, validation, options)
    _open_staging(staging, run, options.resume, shared)
    try:
        tok_info = _staged_tokenizer(staging) if options.resume else None
        if tok_info is None:
            shared.clear_units()  # units of another tokenizer are not this run's
            shutil.rmtree(staging / TOKENIZER_DIR, ignore_errors=True)
            tok_info = _prepare_tokenizer(plan, staging / TOKENIZER_DIR, names, options)
            _write_json(
                units_dir / "tokenizer.json", tok_info | {"hash": tokenizer_hash(staging / TOKENIZER_DIR)}
            )
        with ray_session(options.ray_address):
            unit_stats, shards, validation_shards = _run_stages(
                plan, validation, staging, shared, tok_info, names, options
            )
        manifest = _manifest(
            plan, unit_stats, shards, tok_info, tokenizer_hash(staging / TOKENIZER_DIR), options, validation
        )
        if options.has_validation:
            manifest["validation"] = _validation_section(
                plan, validation, unit_stats, validation_shards, manifest, options
            )
        manifest["run"] = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 2),
            **options.recorded("run"),
        }
        if options.packing == "nsp":
            manifest["nsp"] = _nsp_section(unit_stats[: len(plan.units)], manifest["counts"], options)
        write_manifest(staging, manifest)
        _publish(staging, output_dir)
        if (
            target.remote
        ):  # complete: the shards copied within the store, the rest uploaded, the manifest last
            shared.publish(output_dir, options.overwrite)
            shutil.rmtree(output_dir)
    except (ValueError, FileNotFoundError, FileExistsError):  # the data or settings: a rerun meets it again
        shutil.rmtree(staging, ignore_errors=True)
        _quietly(shared.discard)
        raise
    except BaseException:
        kept = _quietly(shared.finished_units) or 0
        if kept:
            logger.warning(
                "preparation stopped with %d of %d units finished, kept in %s: run the same command with "
                "--resume to redo only the rest",
                kept,
                len(plan.units) + (len(validation.units) if validation else 0),
                shared.location,
            )
        else:
            shutil.rmtree(staging, ignore_errors=True)
            _quietly(shared.discard)
        raise
    counts = manifest["counts"]
    logger.info(
        "wrote %s: %d samples in %d shards from %d documents (%d tokens); skipped %s, repaired %s",
        target.uri if target.remote else output_dir,
        counts["samples"],
        counts["shards"],
        counts["documents"],
        counts["tokens"],
        manifest["skipped"],
        manifest["repaired"],
    )
    if "validation" in manifest:
        logger.info(
            "validation split: %d samples in %d shards from %d documents",
            manifest["validation"]["counts"]["samples"],
            manifest["validation"]["counts"]["shards"],
            manifest["validation"]["counts"]["documents"],
        )
    return manifest


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def _run_identity(plan: Plan, validation: Plan | None, options: PrepOptions) -> dict[str, Any]:
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


def _quietly(action: Callable[[], Any]) -> Any:
    """Clean-up on the way out of a failure: a second failure (the store unreachable) must not hide the first."""
    try:
        return action()
    except OSError as exc:
        logger.warning("could not clean up after the failure: %s", exc)
        return None


def _open_staging(staging: Path, run: dict[str, Any], resume: bool, shared: SharedStaging) -> None:
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
    _write_json(record, run)


def _staged_tokenizer(staging: Path) -> dict[str, Any] | None:
    """The tokenizer an interrupted run left in ``staging``, if it is whole (its hash checked)."""
    try:
        info = json.loads((staging / UNITS_DIR / "tokenizer.json").read_text(encoding="utf-8"))
        if tokenizer_hash(staging / TOKENIZER_DIR) == info.pop("hash"):
            return info
    except (OSError, ValueError, KeyError):
        pass
    return None


def _nsp_section(train_stats: list[dict], counts: dict[str, Any], options: PrepOptions) -> dict[str, Any]:
    """How balanced next-sentence prediction is: the share of random-next samples, and how many sentences
    the chunks samples were cut from held (a one-sentence chunk can only give a random next); a warning
    that says why when the share is off ``random_next_prob`` by more than 0.05 or one-sentence chunks
    are too many (the sample builder then has little to pair)."""
    segments: dict[str, int] = {}
    for s in train_stats:
        for key, n in s.get("segments_per_sample", {}).items():
            segments[key] = segments.get(key, 0) + n
    samples = counts["samples"]
    ratio = counts["nsp_random_next"] / samples if samples else 0.0
    section: dict[str, Any] = {
        "random_next_ratio": round(ratio, 4),
        "segments_per_sample": {k: segments[k] for k in sorted(segments, key=int)},
    }
    single = segments.get("1", 0) / samples if samples else 0.0
    problems = []
    if abs(ratio - options.random_next_prob) > 0.05:
        problems.append(f"random-next ratio {ratio:.3f}, expected {options.random_next_prob:g} ± 0.05")
    if single > MAX_SINGLE_SEGMENT_SHARE:
        problems.append(f"{single:.0%} of the samples come from a one-sentence chunk")
    if samples >= MIN_SAMPLES_FOR_BALANCE and problems:
        why = (
            "most documents yield a single sentence or few: check --sentence-splitter, or --rows-per-document "
            "for one-sentence-per-row data"
            if single > MAX_SINGLE_SEGMENT_SHARE
            else "the documents are short for the sample length: consider a smaller --seq-len"
        )
        section["warning"] = f"{'; '.join(problems)}: {why}"
        logger.warning("NSP imbalance: %s", section["warning"])
    return section


def _plan_validation(plan: Plan, options: PrepOptions) -> Plan | None:
    """The units of ``validation_inputs`` (None without them), numbered after the training units so unit
    files and random seeds stay apart; an input that is also a training input is refused (it would leak)."""
    if not options.validation_inputs:
        return None
    validation = _plan(options.validation_inputs, (), options)
    if not validation.units:
        raise ValueError(
            f"empty validation input: nothing readable in {list(options.validation_inputs)}; "
            f"skipped: {validation.skipped_files}"
        )
    shared = {s["path"] for s in plan.sources if "path" in s} & {s["path"] for s in validation.sources}
    if shared:
        raise ValueError(
            f"{sorted(shared)[0]} is both a training and a validation input: its text would be in both splits"
        )
    offset = len(plan.units)
    validation.units = [replace(u, index=offset + u.index, split="validation") for u in validation.units]
    return validation


def _prepare_tokenizer(plan: Plan, out_dir: Path, names: list[str], options: PrepOptions) -> dict[str, Any]:
    if options.tokenizer is not None:
        return tokenization.load_tokenizer(options.tokenizer, out_dir)
    logger.info(
        "training a %s tokenizer (vocab %d) on the corpus", options.train_tokenizer, options.vocab_size
    )
    texts = _training_texts(
        plan,
        seed=options.seed,
        budget=options.tokenizer_sample_bytes,
        max_line_length=options.max_line_length,
        validation_fraction=options.validation_fraction,
    )
    if not any(text.strip() for text in texts):
        raise ValueError(f"empty corpus: no text in {names}")
    return tokenization.train_tokenizer(
        texts,
        out_dir,
        kind=options.train_tokenizer,
        vocab_size=options.vocab_size,
        lowercase=options.lowercase,
        seq_len=options.seq_len,
        show_progress=options.progress,
    )


def _run_stages(
    plan: Plan,
    validation: Plan | None,
    staging: Path,
    shared: SharedStaging,
    tok_info: dict[str, Any],
    names: list[str],
    options: PrepOptions,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Stage 1 (units → samples) and stage 2 (samples → shards) on Ray; the unit files are removed after.

    Returns the units' counts (training units, then validation-input units) and both splits' shard entries.
    """
    units_dir = shared.units
    config = BuildConfig(
        tokenizer_dir=shared.tokenizer(staging / TOKENIZER_DIR),
        units_dir=units_dir,
        cls_id=tok_info["special_ids"]["cls"],
        sep_id=tok_info["special_ids"]["sep"],
        vocab_size=tok_info["vocab_size"],
        options=options,
    )
    workers = options.num_workers
    units = plan.units + (validation.units if validation else [])
    kept = {u.index: stats for u in units if (stats := finished_unit(units_dir, u.index)) is not None}
    if kept:
        logger.info("%d of %d units finished before, their files verified: kept", len(kept), len(units))
    todo = [u for u in units if u.index not in kept]
    built = _run_tasks(
        todo,
        build_samples,
        {"config": config},
        workers,
        what="units",
        progress=options.progress,
        on_done=lambda n: inject_driver_kill(len(kept) + n),
    )
    unit_stats = sorted([*kept.values(), *built], key=lambda s: s["unit"])
    train_stats = unit_stats[: len(plan.units)]
    done = [(unit_file(units_dir, s["unit"]), s["samples"]) for s in train_stats if "failed" not in s]
    specs = plan_shards(done, options.shard_size)
    if not specs:
        issues = ReadCounters()
        for s in train_stats:
            issues.add(ReadCounters(**s["counters"]))
        raise ValueError(f"empty corpus: no training sample from {names} (input issues: {issues.as_dict()})")
    if options.has_validation:
        held = [
            (unit_file(units_dir, s["unit"], "validation"), s["validation"]["samples"])
            for s in unit_stats
            if "validation" in s
        ]
        validation_specs = plan_shards(held, options.shard_size, VALIDATION_DIR)
        if not validation_specs:
            source = (
                f"validation inputs {list(options.validation_inputs)}"
                if validation
                else f"validation_fraction {options.validation_fraction:g} of {names}"
            )
            raise ValueError(f"empty validation split: no sample from the {source}")
        if not shared.remote:
            (staging / VALIDATION_DIR).mkdir()
        specs += validation_specs
    schema = shard_schema(tok_info["vocab_size"], options.packing)
    written = _run_tasks(
        specs,
        write_shards,
        {"out_dir": shared.location.uri, "schema": schema},
        workers,
        what="shards",
        progress=options.progress,
    )
    shutil.rmtree(staging / UNITS_DIR)
    if shared.remote:
        (shared.location / UNITS_DIR).delete()
    shards = sorted((e for e in written if "dir" not in e), key=lambda entry: entry["file"])
    held_shards = sorted(
        ({k: v for k, v in e.items() if k != "dir"} for e in written if "dir" in e), key=lambda e: e["file"]
    )
    return unit_stats, shards, held_shards


def _validation_section(
    plan: Plan,
    validation: Plan | None,
    unit_stats: list[dict],
    shards: list[dict],
    manifest: dict[str, Any],
    options: PrepOptions,
) -> dict[str, Any]:
    """The manifest's ``validation`` section: how its documents were chosen, from what, counts and shards."""
    totals = dict.fromkeys(_TOTALS, 0)
    for s in unit_stats:
        for key in totals:
            totals[key] += s.get("validation", {}).get(key, 0)
    if options.packing != "nsp":
        totals.pop("nsp_random_next")
    units = len(validation.units) if validation else len(plan.units)
    return {
        "dir": VALIDATION_DIR,
        "config": options.recorded("validation"),
        "selection": "every document of validation_inputs" if validation else HELD_OUT_RULE,
        "sources": validation.sources if validation else manifest["sources"],
        "counts": {"units": units, "shards": len(shards), **totals},
        "shards": shards,
    }


def _manifest(
    plan: Plan,
    unit_stats: list[dict],
    shards: list[dict],
    tok_info: dict[str, Any],
    tok_hash: str,
    options: PrepOptions,
    validation: Plan | None = None,
) -> dict[str, Any]:
    counters = ReadCounters()
    totals = dict.fromkeys(_TOTALS, 0)
    failed = []
    for s in unit_stats:  # the training units' counts; every unit's input issues (validation inputs too)
        counters.add(ReadCounters(**s["counters"]))
        if "failed" in s:
            failed.append(s["failed"])
        for key in totals:
            totals[key] += s.get(key, 0)
    if options.packing != "nsp":
        totals.pop("nsp_random_next")
    issues = counters.as_dict()
    return {
        "format_version": FORMAT_VERSION,
        **options.recorded("top"),
        "sources": plan.sources,
        # The tokenizer's own casing: a given tokenizer keeps its own, whatever options.lowercase says.
        "config": options.recorded("config") | {"lowercase": tok_info["lowercase"]},
        "tokenizer": {"dir": TOKENIZER_DIR, "hash": tok_hash, **tok_info},
        "counts": {"units": len(plan.units), "shards": len(shards), **totals},
        "skipped": {"files": plan.skipped_files + (validation.skipped_files if validation else []) + failed}
        | {k: v for k, v in issues.items() if k != "invalid_utf8_lines"},
        "repaired": {"invalid_utf8_lines": issues["invalid_utf8_lines"]},
        "shards": shards,
    }


def _plan(inputs, hf_datasets, options: PrepOptions):
    """The units of work of ``inputs`` (and hub datasets) under the reading settings of ``options``."""
    return plan_units(
        inputs,
        hf_datasets,
        text_column=options.text_column,
        doc_per_file=options.doc_per_file,
        rows_per_document=options.rows_per_document,
        unit_bytes=options.unit_bytes,
        max_line_length=options.max_line_length,
    )
