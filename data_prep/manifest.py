"""What a prepared corpus's ``manifest.json`` says: the settings that shaped it, its sources, tokenizer, counts,
what was skipped or repaired, its shards, the validation split and how balanced next-sentence prediction is.

Built by the driver from the units' records once every shard is written; how it is written and read back is
``data_prep.format``'s.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from data_prep.format import FORMAT_VERSION, TOKENIZER_DIR, VALIDATION_DIR
from data_prep.options import PrepOptions
from data_prep.sources import Plan, ReadCounters
from data_prep.units import HELD_OUT_RULE

logger = logging.getLogger("data_prep")
MIN_SAMPLES_FOR_BALANCE = 200  # below this, the random-next share is too noisy to warn about
# One-sentence chunks can only give a random next: on well-split text they are 10-20% of the samples
# (the ends of documents, long sentences), on text split too coarsely 40% and more.
MAX_SINGLE_SEGMENT_SHARE = 0.3
_TOTALS = ("documents", "sentences", "tokens", "samples", "sample_tokens", "nsp_random_next")


def build_manifest(
    plan: Plan,
    validation: Plan | None,
    unit_stats: list[dict],
    shards: tuple[list[dict], list[dict]],
    tokenizer: tuple[dict[str, Any], str],
    options: PrepOptions,
    started: float,
) -> dict[str, Any]:
    """The manifest of a finished run: ``unit_stats`` are the units' records (training units first), ``shards``
    the training and validation shard entries, ``tokenizer`` its description and hash, ``started`` the run's
    ``time.perf_counter()`` at its start."""
    manifest = _core(plan, validation, unit_stats, shards[0], tokenizer, options)
    if options.has_validation:
        manifest["validation"] = _validation_section(
            plan, validation, unit_stats, shards[1], manifest, options
        )
    manifest["run"] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
        **options.recorded("run"),
    }
    if options.packing == "nsp":
        manifest["nsp"] = _nsp_section(unit_stats[: len(plan.units)], manifest["counts"], options)
    return manifest


def _core(
    plan: Plan,
    validation: Plan | None,
    unit_stats: list[dict],
    shards: list[dict],
    tokenizer: tuple[dict[str, Any], str],
    options: PrepOptions,
) -> dict[str, Any]:
    """Settings, sources, tokenizer, counts (the training units'), skips (every unit's), shards."""
    tok_info, tok_hash = tokenizer
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
