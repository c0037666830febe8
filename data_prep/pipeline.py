"""``prepare_corpus``: text in, tokenizer + fixed-size Parquet shards + manifest out, in parallel on Ray.

Flow (driver → Ray tasks → driver)::

    plan units (driver: file sizes, Parquet footers, hub shard lists; validation inputs too)
    tokenizer: copy the given one, or train on a seeded sample of the training documents (driver)
    stage 1  one Ray task per unit: read → sentences → token ids → samples → unit file per split + record
    stage 2  one Ray task per shard: row ranges of unit files → shard-NNNNN.parquet
             (validation/shard-NNNNN.parquet for the validation split)
    manifest.json, then rename the staging directory into place

This module is that flow; its parts live apart: the Ray tasks and their retries (``data_prep.execution``), the
staging directory and ``--resume`` (``data_prep.staging``; an object-store output's staging prefix,
``data_prep.remote``), the manifest's content (``data_prep.manifest``).

A validation split (``validation_fraction`` or ``validation_inputs``) is made of whole documents that no
training sample (nor the trained tokenizer) saw; the manifest's ``validation`` section describes it. A
run without one writes exactly what it wrote before the option existed.

Nothing is published before it is complete: a failed or interrupted run never leaves a half-written corpus
behind, and a reader of an ``s3://`` / ``gs://`` output finds a whole corpus or none (``manifest.json`` goes
last). A task that fails transiently is retried by Ray (``data_prep.failures``). A run that stops half-way
keeps its finished units, each recorded with the SHA-256 of its files; ``resume`` keeps the intact ones and
redoes the rest, which gives the same output since a unit's output depends on nothing else.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_prep import staging as stage
from data_prep.corpus_tokenizer import corpus_tokenizer
from data_prep.execution import build_samples, ray_session, run_tasks, write_shards
from data_prep.failures import inject_driver_kill
from data_prep.format import TOKENIZER_DIR, VALIDATION_DIR, shard_schema, tokenizer_hash, write_manifest
from data_prep.manifest import build_manifest
from data_prep.options import PrepOptions
from data_prep.remote import UNITS_DIR, SharedStaging, build_dir
from data_prep.shards import plan_shards
from data_prep.sources import Plan, ReadCounters, plan_units
from data_prep.units import BuildConfig, finished_unit, unit_file
from sparsebert import storage

logger = logging.getLogger("data_prep")


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
    staging = stage.staging_dir(output_dir)
    shared = SharedStaging(
        target, staging
    )  # what workers write: the staging directory, or a prefix in the store
    stage.open_staging(staging, stage.run_identity(plan, validation, options), options.resume, shared)
    try:
        manifest = _build(plan, validation, staging, shared, names, options, started)
        stage.publish(staging, output_dir)
        if (
            target.remote
        ):  # complete: the shards copied within the store, the rest uploaded, the manifest last
            shared.publish(output_dir, options.overwrite)
            shutil.rmtree(output_dir)
    except (ValueError, FileNotFoundError, FileExistsError):  # the data or settings: a rerun meets it again
        stage.discard(staging, shared)
        raise
    except BaseException:
        stage.keep_for_resume(staging, shared, len(plan.units) + (len(validation.units) if validation else 0))
        raise
    _log_written(manifest, target.uri if target.remote else output_dir)
    return manifest


def _build(
    plan: Plan,
    validation: Plan | None,
    staging: Path,
    shared: SharedStaging,
    names: list[str],
    options: PrepOptions,
    started: float,
) -> dict[str, Any]:
    """The whole corpus in ``staging`` (shards in ``shared``): tokenizer, both stages, manifest."""
    tok_info = corpus_tokenizer(plan, staging, shared, names, options)
    with ray_session(options.ray_address):
        unit_stats, shards = _run_stages(plan, validation, staging, shared, tok_info, names, options)
    tokenizer = (tok_info, tokenizer_hash(staging / TOKENIZER_DIR))
    manifest = build_manifest(plan, validation, unit_stats, shards, tokenizer, options, started)
    write_manifest(staging, manifest)
    return manifest


def _log_written(manifest: dict[str, Any], where: Any) -> None:
    counts = manifest["counts"]
    logger.info(
        "wrote %s: %d samples in %d shards from %d documents (%d tokens); skipped %s, repaired %s",
        where,
        counts["samples"],
        counts["shards"],
        counts["documents"],
        counts["tokens"],
        manifest["skipped"],
        manifest["repaired"],
    )
    if "validation" in manifest:
        held = manifest["validation"]["counts"]
        logger.info(
            "validation split: %d samples in %d shards from %d documents",
            held["samples"],
            held["shards"],
            held["documents"],
        )


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


def _run_stages(
    plan: Plan,
    validation: Plan | None,
    staging: Path,
    shared: SharedStaging,
    tok_info: dict[str, Any],
    names: list[str],
    options: PrepOptions,
) -> tuple[list[dict], tuple[list[dict], list[dict]]]:
    """Stage 1 (units → samples) and stage 2 (samples → shards) on Ray; the unit files are removed after.

    Returns the units' counts (training units, then validation-input units) and both splits' shard entries.
    """
    config = BuildConfig(
        tokenizer_dir=shared.tokenizer(staging / TOKENIZER_DIR),
        units_dir=shared.units,
        cls_id=tok_info["special_ids"]["cls"],
        sep_id=tok_info["special_ids"]["sep"],
        vocab_size=tok_info["vocab_size"],
        options=options,
    )
    unit_stats = _build_units(plan.units + (validation.units if validation else []), config, options)
    specs = _shard_specs(unit_stats, len(plan.units), shared.units, validation, names, options)
    if options.has_validation and not shared.remote:
        (staging / VALIDATION_DIR).mkdir()
    written = run_tasks(
        specs,
        write_shards,
        {"out_dir": shared.location.uri, "schema": shard_schema(tok_info["vocab_size"], options.packing)},
        options.num_workers,
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
    return unit_stats, (shards, held_shards)


def _build_units(units: list, config: BuildConfig, options: PrepOptions) -> list[dict]:
    """Stage 1: every unit's samples and record, those a stopped run finished (their files verified) kept."""
    kept = {u.index: stats for u in units if (stats := finished_unit(config.units_dir, u.index)) is not None}
    if kept:
        logger.info("%d of %d units finished before, their files verified: kept", len(kept), len(units))
    built = run_tasks(
        [u for u in units if u.index not in kept],
        build_samples,
        {"config": config},
        options.num_workers,
        what="units",
        progress=options.progress,
        on_done=lambda n: inject_driver_kill(len(kept) + n),
    )
    return sorted([*kept.values(), *built], key=lambda s: s["unit"])


def _shard_specs(
    unit_stats: list[dict],
    train_units: int,
    units_dir: str,
    validation: Plan | None,
    names: list[str],
    options: PrepOptions,
) -> list:
    """Stage 2's work: the training shards' row ranges of unit files, then the validation split's; an empty
    split is an error naming where its samples should have come from."""
    train_stats = unit_stats[:train_units]
    done = [(unit_file(units_dir, s["unit"]), s["samples"]) for s in train_stats if "failed" not in s]
    specs = plan_shards(done, options.shard_size)
    if not specs:
        issues = ReadCounters()
        for s in train_stats:
            issues.add(ReadCounters(**s["counters"]))
        raise ValueError(f"empty corpus: no training sample from {names} (input issues: {issues.as_dict()})")
    if not options.has_validation:
        return specs
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
    return specs + validation_specs


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
