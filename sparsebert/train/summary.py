"""The few lines a run ends with: what it did, whether the model learned, where its results are — and a fill-mask
example from the trained model, so that "learned" can be judged by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def fill_mask(model, tokenizer, text: str, top_k: int = 3) -> str:
    """``text`` with each ``[MASK]`` replaced by the model's ``top_k`` guesses: ``def (41%) | class (9%) | ...``."""
    encoded = tokenizer(text, return_tensors="pt", truncation=True)
    if not (encoded["input_ids"] == tokenizer.mask_token_id).any():
        raise ValueError(f"eval.fill_mask: {text!r} has no {tokenizer.mask_token}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in encoded.items()}).prediction_logits[0]
    model.train(was_training)
    guesses = []
    for position in (encoded["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist():
        probs, ids = logits[position].float().softmax(-1).topk(top_k)
        words = [
            f"{tokenizer.convert_ids_to_tokens(int(i))} ({p:.0%})" for p, i in zip(probs, ids, strict=True)
        ]
        guesses.append(" | ".join(words))
    return f"{text!r} → " + " ; ".join(guesses)


def summary_lines(
    *,
    steps: int,
    search_steps: int,
    seconds: float,
    start: dict[str, float],
    end: dict[str, float],
    sparsity: float | None,
    pattern: str,
    final_dir: str | Path,
    mlflow: dict[str, Any],
) -> list[str]:
    """The closing summary; ``start``/``end`` are held-out metrics (``val/...``), empty when there are none."""
    minutes, secs = divmod(round(seconds), 60)
    stages = (
        f" ({search_steps} searching the mask, {steps - search_steps} with it frozen)" if search_steps else ""
    )
    lines = [f"steps: {steps}{stages} in {minutes}m {secs:02d}s"]
    if start and end:
        lines.append(
            f"held-out MLM loss {start['val/mlm_loss']:.2f} → {end['val/mlm_loss']:.2f}, "
            f"accuracy {start['val/mlm_accuracy']:.1%} → {end['val/mlm_accuracy']:.1%}"
            + (
                f"; NSP accuracy {start['val/nsp_accuracy']:.1%} → {end['val/nsp_accuracy']:.1%}"
                if "val/nsp_accuracy" in end
                else ""
            )
        )
    elif end:
        lines.append(f"held-out MLM loss {end['val/mlm_loss']:.2f}, accuracy {end['val/mlm_accuracy']:.1%}")
    if sparsity is not None:
        lines.append(
            f"mask: {pattern}, sparsity {sparsity:.1%} (the share of query-key pairs never attended)"
        )
    lines.append(f"model: {final_dir}")
    if mlflow.get("run_id", "").startswith("local-"):
        lines.append(
            f"MLflow: unreachable; send the records later with `python -m sparsebert.track.resync {mlflow['out']}`"
        )
    elif mlflow.get("run_id"):
        lines.append(
            f"MLflow: run {mlflow['run_id']} in experiment {mlflow['experiment']!r}; "
            f"see it with `mlflow ui --backend-store-uri {mlflow['uri']}`, then "
            "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
        )
    return lines
