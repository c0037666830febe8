"""The end of a run as others receive it: ``output_dir/final`` written as a folder transformers alone loads (the
model code beside the weights, ``export.standalone``), with what the run knows about it (:data:`RUN_FILE`: data,
steps, tokens, held-out metrics) and the model card made from that, then uploaded to the Hub when
``export.push_to_hub`` asks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sparsebert.export.card import RUN_FILE
from sparsebert.train import checkpoint
from sparsebert.train import distributed as ds_setup
from sparsebert.train.run_report import report
from sparsebert.train.setup import Run

log = logging.getLogger(__name__)

# What the card shows of a corpus manifest (its shard list and preparation settings stay in the corpus).
_MANIFEST_KEYS = ("sources", "counts", "seq_len", "packing", "seed")


def export_final(run: Run) -> Path:
    """Write ``output_dir/final`` (every rank calls this; rank 0 writes): weights, config, tokenizer, the model code
    when ``export.standalone``, the run's record and the model card."""
    final = run.out / "final"
    checkpoint.export_final(
        run.model,
        run.ds,
        final,
        run.reader.tokenizer_dir,
        run.tracker.run_id,
        {"step": run.state.step, **run.validation},
        standalone=run.config.export.standalone,
        record={RUN_FILE: run_record(run)},
        card_name=run.outputs.where("final"),
    )
    return final


def run_record(run: Run) -> dict[str, Any]:
    """What the model card says about the run: data, steps, tokens, held-out metrics, the config."""
    config, steps = run.config, run.state.step
    train = config.train
    batch = train.micro_batch_size * train.grad_accum_steps * ds_setup.world_size()
    manifest = run.reader.manifest
    summary = {key: manifest[key] for key in _MANIFEST_KEYS if key in manifest}
    summary["tokenizer"] = {k: v for k, v in manifest.get("tokenizer", {}).items() if k != "special_ids"}
    if "validation" in manifest:
        summary["validation"] = {"counts": manifest["validation"].get("counts", {})}
    return {
        "steps": steps,
        "search_steps": run.state.search_steps or config.search_steps,
        "sequence_length": run.seq_len,
        "global_batch": batch,
        "tokens": steps * batch * run.seq_len,
        "held_out": dict(run.validation),
        "held_out_start": dict(run.start_validation),
        "data": {
            "description": config.data.path or "the embedded Python-docs corpus",
            "manifest": summary,
        },
        "mlflow_run_id": run.tracker.run_id,
        "mlflow_experiment": config.mlflow.experiment,
        "config": config.to_dict(),
    }


def push_to_hub(run: Run, final: Path) -> str | None:
    """Upload ``final`` to ``export.push_to_hub`` (rank 0; every rank calls this); returns the error, or None when
    it went up (or was not asked for). A failed upload loses nothing: the message says how to retry."""
    repo = run.config.export.push_to_hub
    if repo is None or not run.rank0:
        return None
    from sparsebert.export.hub import HubError, push_folder

    try:
        with ds_setup.models_built_whole():  # the card is written again, by rank 0 alone
            url = push_folder(final, repo, private=run.config.export.private)
    except HubError as err:
        retry = f"python -m sparsebert.export.hub {final} {repo}"
        report(f"error: {err}; the run is complete and {final} is kept: upload it with `{retry}`")
        return str(err)
    report(f"uploaded final/ to the Hub: {url}")
    return None
