"""``prepare_corpus``: text in, tokenizer + fixed-size Parquet shards + manifest out, in parallel on Ray.

Flow (driver → Ray Data → driver)::

    plan units (driver: file sizes, Parquet footers, hub shard lists; validation inputs too)
    tokenizer: copy the given one, or train on a seeded sample of the training documents (driver)
    stage 1  Ray Data, one task per unit: read → sentences → token ids → samples → unit file per split
    stage 2  Ray Data, one task per shard: row ranges of unit files → shard-NNNNN.parquet
             (validation/shard-NNNNN.parquet for the validation split)
    manifest.json, then rename the staging directory into place

A validation split (``validation_fraction`` or ``validation_inputs``) is made of whole documents that no
training sample (nor the trained tokenizer) saw; the manifest's ``validation`` section describes it. A
run without one writes exactly what it wrote before the option existed.

Everything is written to a hidden staging directory next to the output and renamed into place only
when complete, so a failed or interrupted run never leaves a half-written corpus behind.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import pickle
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep import tokenizer as tokenization
from data_prep.format import (
    FORMAT_VERSION,
    TOKENIZER_DIR,
    VALIDATION_DIR,
    shard_schema,
    tokenizer_hash,
    write_manifest,
)
from data_prep.options import PrepOptions
from data_prep.shards import plan_shards, write_shard
from data_prep.sources import Plan, ReadCounters, plan_units, read_documents
from data_prep.units import HELD_OUT_RULE, BuildConfig, build_unit, held_out, unit_file

logger = logging.getLogger("data_prep")
_TOTALS = ("documents", "sentences", "tokens", "samples", "sample_tokens", "nsp_random_next")


@contextlib.contextmanager
def ray_session(address: str | None = None, *, progress: bool = True) -> Iterator[None]:
    """Use the caller's Ray if it is running; otherwise start one (local, or ``address``) and stop it after."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    previous, context.enable_progress_bars = context.enable_progress_bars, progress
    try:
        yield
    finally:
        context.enable_progress_bars = previous
        if started:
            ray.shutdown()


def _reported(fn: Callable[..., dict], *args: Any) -> str:
    """Run ``fn`` in a worker; expected errors come back as data, so the driver can raise them as they
    are (Ray would wrap them in its own exception type)."""
    try:
        return json.dumps(fn(*args))
    except (ValueError, OSError) as exc:
        return json.dumps({"error": type(exc).__name__, "message": str(exc)})


def build_samples(batch: dict[str, Any], config: BuildConfig) -> dict[str, list[str]]:
    """Ray Data stage 1 (the name shows in the progress output)."""
    return {"out": [_reported(build_unit, pickle.loads(blob), config) for blob in batch["item"]]}


def write_shards(batch: dict[str, Any], out_dir: str, schema_blob: bytes) -> dict[str, list[str]]:
    """Ray Data stage 2."""
    schema = pickle.loads(schema_blob)
    return {"out": [_reported(write_shard, pickle.loads(blob), out_dir, schema) for blob in batch["item"]]}


def _ray_map(
    items: Sequence[Any], fn: Callable, fn_kwargs: dict[str, Any], num_workers: int | None
) -> list[dict]:
    """``fn`` over ``items`` with Ray Data: one item per task, at most ``num_workers`` tasks at a time."""
    import ray

    dataset = ray.data.from_items([{"item": pickle.dumps(i)} for i in items], override_num_blocks=len(items))
    compute = ray.data.TaskPoolStrategy(size=min(num_workers, len(items))) if num_workers else None
    mapped = dataset.map_batches(fn, batch_size=1, fn_kwargs=fn_kwargs, compute=compute, num_cpus=1)
    results = [json.loads(row["out"]) for row in mapped.take_all()]
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
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and (
        not output_dir.is_dir() or (any(output_dir.iterdir()) and not options.overwrite)
    ):
        raise FileExistsError(
            f"{output_dir} exists and is not an empty directory; use overwrite=True (--overwrite)"
        )
    names = [str(i) for i in inputs] + [s.name for s in options.hf_datasets]
    if not names:
        raise ValueError("nothing to prepare: give input paths and/or a Hugging Face dataset")
    plan = _plan(inputs, options.hf_datasets, options)
    if not plan.units:
        raise ValueError(f"empty corpus: nothing readable in {names}; skipped: {plan.skipped_files}")
    logger.info("%d units of work from %d sources", len(plan.units), len(plan.sources))
    validation = _plan_validation(plan, options)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # hidden, next to the output: same filesystem, so the final rename is atomic
    try:
        tok_info = _prepare_tokenizer(plan, staging / TOKENIZER_DIR, names, options)
        with ray_session(options.ray_address, progress=options.progress):
            unit_stats, shards, validation_shards = _run_stages(
                plan, validation, staging, tok_info, names, options
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
        write_manifest(staging, manifest)
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = manifest["counts"]
    logger.info(
        "wrote %s: %d samples in %d shards from %d documents (%d tokens); skipped %s, repaired %s",
        output_dir,
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
    tok_info: dict[str, Any],
    names: list[str],
    options: PrepOptions,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Stage 1 (units → samples) and stage 2 (samples → shards) on Ray; the unit files are removed after.

    Returns the units' counts (training units, then validation-input units) and both splits' shard entries.
    """
    units_dir = staging / "_units"
    units_dir.mkdir()
    config = BuildConfig(
        tokenizer_dir=str(staging / TOKENIZER_DIR),
        units_dir=str(units_dir),
        cls_id=tok_info["special_ids"]["cls"],
        sep_id=tok_info["special_ids"]["sep"],
        vocab_size=tok_info["vocab_size"],
        options=options,
    )
    workers = options.num_workers
    units = plan.units + (validation.units if validation else [])
    unit_stats = sorted(_ray_map(units, build_samples, {"config": config}, workers), key=lambda s: s["unit"])
    train_stats = unit_stats[: len(plan.units)]
    done = [(str(unit_file(units_dir, s["unit"])), s["samples"]) for s in train_stats if "failed" not in s]
    specs = plan_shards(done, options.shard_size)
    if not specs:
        issues = ReadCounters()
        for s in train_stats:
            issues.add(ReadCounters(**s["counters"]))
        raise ValueError(f"empty corpus: no training sample from {names} (input issues: {issues.as_dict()})")
    if options.has_validation:
        held = [
            (str(unit_file(units_dir, s["unit"], "validation")), s["validation"]["samples"])
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
        (staging / VALIDATION_DIR).mkdir()
        specs += validation_specs
    schema = pickle.dumps(shard_schema(tok_info["vocab_size"], options.packing))
    written = _ray_map(specs, write_shards, {"out_dir": str(staging), "schema_blob": schema}, workers)
    shutil.rmtree(units_dir)
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
