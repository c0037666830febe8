"""The corpus's tokenizer, prepared by the driver before stage 1: the one ``options.tokenizer`` names (copied), the
one a stopped run left (with ``resume``, its hash checked), or one trained on a seeded sample of the training
documents (never a document held out for validation).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep import staging as stage
from data_prep import tokenizer as tokenization
from data_prep.format import TOKENIZER_DIR
from data_prep.options import PrepOptions
from data_prep.remote import SharedStaging
from data_prep.sources import Plan, ReadCounters, read_documents
from data_prep.units import held_out

logger = logging.getLogger("data_prep")


def corpus_tokenizer(
    plan: Plan, staging: Path, shared: SharedStaging, names: list[str], options: PrepOptions
) -> dict[str, Any]:
    """The tokenizer in ``staging/tokenizer`` and its description (the manifest's); a new one makes the units
    of a stopped run stale, so they are forgotten."""
    info = stage.staged_tokenizer(staging) if options.resume else None
    if info is None:
        shared.clear_units()  # units of another tokenizer are not this run's
        shutil.rmtree(staging / TOKENIZER_DIR, ignore_errors=True)
        info = _prepare_tokenizer(plan, staging / TOKENIZER_DIR, names, options)
        stage.record_tokenizer(staging, info)
    return info


def _prepare_tokenizer(plan: Plan, out_dir: Path, names: list[str], options: PrepOptions) -> dict[str, Any]:
    """Copy the tokenizer ``options.tokenizer`` names, or train one on the corpus."""
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
