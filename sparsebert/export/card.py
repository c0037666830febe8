"""The model card of an export folder: ``README.md`` with the Hub's metadata header, and its figures.

Everything in it is read from the folder itself, so a card can be written again whenever the folder learns more
(``eval.run`` adds its results): ``config.json`` (the pattern and its parameters, the sizes), the weights (the mask
in force: sparsity per head, its picture, DAM's importance by distance), and the records the writers leave beside
them — :data:`RUN_FILE` (pre-training: data manifest, steps, tokens, held-out metrics), :data:`EVAL_FILE`
(``eval.run``'s table row) and :data:`FINETUNE_FILE` (a fine-tuned model: task, recipe, dev metrics).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

RUN_FILE = "pretraining_run.json"
EVAL_FILE = "evaluation.json"
FINETUNE_FILE = "finetuning.json"
CARD = "README.md"
FIGURES = "figures"
PIPELINES = {"pretraining": "fill-mask", "glue": "text-classification", "squad": "question-answering"}
AUTO_CLASS = {
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
CITATION = """@inproceedings{shi2021sparsebert,
  title     = {{SparseBERT}: Rethinking the Importance Analysis in Self-attention},
  author    = {Shi, Han and Gao, Jiahui and Ren, Xiaozhe and Xu, Hang and Liang, Xiaodan and Li, Zhenguo and
               Kwok, James T.},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {139},
  pages     = {9547--9557},
  publisher = {PMLR},
  year      = {2021},
  url       = {https://proceedings.mlr.press/v139/shi21a.html}
}"""


def write_card(folder: str | Path, model_id: str | None = None) -> Path:
    """(Re)write ``folder``'s ``README.md`` and ``figures/``; ``model_id`` (a Hub id) is what its loading example
    names (the folder's path when None)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    run, evaluation, finetune = (_read(folder / name) for name in (RUN_FILE, EVAL_FILE, FINETUNE_FILE))
    seq_len = (finetune or {}).get("max_seq_len") or (run or {}).get("sequence_length")
    seq_len = int(seq_len or min(config["max_position_embeddings"], 512))
    mask = _mask(folder, seq_len)
    pipeline_tag = PIPELINES[finetune["kind"]] if finetune else "fill-mask"
    name = model_id or str(folder)
    sections = [
        _title(config, mask, finetune, name),
        _mask_section(config, mask, folder),
        _finetune_section(finetune) if finetune else "",
        _training_section(run) if run else "",
        _evaluation_section(evaluation) if evaluation else "",
        _loading_section(name, pipeline_tag, config),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    header = _metadata(config, run, evaluation, finetune, pipeline_tag, name)
    path = folder / CARD
    path.write_text(f"---\n{header}---\n\n" + "\n\n".join(s for s in sections if s) + "\n", encoding="utf-8")
    return path


# --- the mask in force --------------------------------------------------------------------------------------


def _mask(folder: Path, seq_len: int) -> dict[str, Any]:
    """The mask at ``seq_len`` (and DAM's importance), read from the weights, with its pictures."""
    import transformers

    from sparsebert.model.masks import sparsity
    from sparsebert.model.modeling import SparseBertModel
    from sparsebert.track.mask_plots import layer_groups, layers_label, mask_figures

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # a head model's folder loads without its head: expected here
    transformers.logging.disable_progress_bar()
    try:
        # The folder is the writer's own export: a pattern its config names by module is code this process runs.
        model = SparseBertModel.from_pretrained(folder, trust_remote_code=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    learned = model.config.mask_spec.learned
    with warnings.catch_warnings():  # a DAM mask used beyond its searched length warns; the card says so
        warnings.simplefilter("ignore", UserWarning)
        hard = model.current_mask(seq_len)
        importance = model.mask_importance(seq_len) if learned else None
    layers = hard.shape[0]
    rows = [
        (layers_label(group, layers), [sparsity(hard[group[0], h]) for h in range(hard.shape[1])])
        for group in layer_groups(hard)
    ]
    figures = mask_figures(model.config.mask_spec.name, hard, importance, _empty(folder / FIGURES))
    return {
        "seq_len": seq_len, "sparsity": sparsity(hard), "rows": rows, "learned": learned,
        "figures": [p.relative_to(folder).as_posix() for p in figures], "searched": model.config.dam_searched_len,
    }  # fmt: skip


def _empty(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.png"):
        old.unlink()
    return directory


# --- sections -----------------------------------------------------------------------------------------------


def _title(config: dict, mask: dict, finetune: dict | None, name: str) -> str:
    pattern = config["attention_pattern"]["name"]
    size = (
        f"{config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, "
        f"{config['num_attention_heads']} heads"
    )
    what = (
        f"fine-tuned on {finetune['task_label']}"
        if finetune
        else "pre-trained with masked language modelling"
    )
    return (
        f"# {_short_name(name)}: a sparse-attention BERT ({pattern})\n\n"
        f"A BERT ({size}) with the **{pattern}** attention mask, {what}: {mask['sparsity']:.1%} of query-key "
        f"pairs are never attended at length {mask['seq_len']}. Made with `sparsebert`, which implements the "
        "attention patterns and the Differentiable Attention Mask (DAM) search of "
        "[SparseBERT](https://proceedings.mlr.press/v139/shi21a.html) (Shi et al., ICML 2021); the model code "
        "ships in this folder."
    )


def _short_name(name: str) -> str:
    """A repo's name, or a folder's (a run's ``final/`` goes by its run directory)."""
    parts = [p for p in name.rstrip("/").split("/") if p]
    return parts[-2] if len(parts) > 1 and parts[-1] == "final" else (parts[-1] if parts else name)


def _mask_section(config: dict, mask: dict, folder: Path) -> str:
    spec = dict(config["attention_pattern"])
    name = spec.pop("name")
    params = ", ".join(f"`{k}` = {json.dumps(v)}" for k, v in sorted(spec.items())) or "none"
    heads = len(mask["rows"][0][1])
    table = ["| layers | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]
    table += [
        f"| {label} | " + " | ".join(f"{s:.1%}" for s in values) + " |" for label, values in mask["rows"]
    ]
    lines = [
        "## The attention mask",
        "",
        f"Pattern **`{name}`**, parameters: {params}; attention backend `{config.get('attention_backend')}`.",
        "",
        f"Sparsity (share of query-key pairs masked) per head at length {mask['seq_len']}:",
        "",
        *table,
    ]
    if mask["learned"]:
        lines += ["", _searched_note(name, mask)]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in mask["figures"]]
    return "\n".join(lines)


def _searched_note(name: str, mask: dict) -> str:
    from sparsebert.model.dam import _RULES  # the rule's wording, defined once with the mask

    searched = mask["searched"]
    if not searched:
        return "A learned (DAM) mask, frozen at 1[α > 0]; the length it was searched at is not recorded."
    beyond = (
        f" It is drawn here at {mask['seq_len']}, beyond that length, where {_RULES.get(name, 'its rule applies')}."
        if mask["seq_len"] > searched
        else ""
    )
    return (
        f"A learned (DAM) mask, frozen at 1[α > 0], searched at sequence length {searched}; at longer lengths "
        f"{_RULES.get(name, 'the extension rule applies')}.{beyond} The importance σ(α) by distance shows what the "
        "search wanted kept."
    )


def _training_section(run: dict) -> str:
    data, steps = run.get("data", {}), run["steps"]
    search = f" ({run['search_steps']} of them searching the mask)" if run.get("search_steps") else ""
    lines = [
        "## Pre-training",
        "",
        f"* steps: {steps}{search}, global batch {run['global_batch']} sequences of {run['sequence_length']} tokens: "
        f"{run['tokens']:,} token positions",
        f"* data: {_data_line(data)}",
    ]
    end, start = run.get("held_out", {}), run.get("held_out_start", {})
    if "val/mlm_loss" in end:
        began = f" (from {start['val/mlm_loss']:.3f}, {start['val/mlm_accuracy']:.1%})" if start else ""
        nsp = f"; NSP accuracy {end['val/nsp_accuracy']:.1%}" if "val/nsp_accuracy" in end else ""
        lines.append(
            f"* held-out MLM loss {end['val/mlm_loss']:.3f}, accuracy {end['val/mlm_accuracy']:.1%}{began}{nsp}"
        )
    train = run.get("config", {}).get("train", {})
    if train:
        lines.append(
            f"* optimizer {train.get('optimizer')}, peak learning rate {train.get('lr')}, warm-up "
            f"{train.get('warmup_steps')} steps, {train.get('decay')} decay, seed {train.get('seed')}"
        )
    if run.get("mlflow_run_id"):
        lines.append(f"* MLflow run `{run['mlflow_run_id']}` (experiment `{run.get('mlflow_experiment')}`)")
    return "\n".join(lines)


def _data_line(data: dict) -> str:
    manifest = data.get("manifest", {})
    sources = ", ".join(_source(s) for s in manifest.get("sources", [])) or "?"
    counts, tokenizer = manifest.get("counts", {}), manifest.get("tokenizer", {})
    held_out = manifest.get("validation", {}).get("counts", {})
    line = (
        f"{data.get('description', 'a prepared corpus')} ({sources}): {counts.get('documents', '?')} documents, "
        f"{counts.get('samples', '?')} samples of {manifest.get('seq_len', '?')} tokens, {counts.get('tokens', '?')} "
        f"tokens; tokenizer {tokenizer.get('source', '?')}, vocabulary {tokenizer.get('vocab_size', '?')}"
    )
    return line + (f"; {held_out['documents']} documents held out" if held_out.get("documents") else "")


def _source(source: dict) -> str:
    if source.get("type") == "huggingface":
        return f"`{source['name']}`" + (f" ({source['config']})" if source.get("config") else "")
    return f"`{Path(str(source.get('path', '?'))).name}`"


def _finetune_section(finetune: dict) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(finetune["dev_metrics"].items()))
    recipe = finetune.get("recipe", {})
    return "\n".join(
        [
            "## Fine-tuning",
            "",
            f"* task: {finetune['task_label']}; labels: {', '.join(map(str, finetune.get('labels') or ['(regression)']))}",
            f"* from: `{finetune['base_model']}`",
            f"* learning rate {finetune['lr']:g}, seed {finetune['seed']}, {recipe.get('epochs')} epochs, batch "
            f"{recipe.get('batch_size')}, sequence length {finetune.get('max_seq_len')}",
            f"* dev: {metrics}",
            f"* kept because: {finetune['kept']}",
        ]
    )


def _evaluation_section(evaluation: dict) -> str:
    lines = [
        "## Evaluation",
        "",
        f"Fine-tuned with its own mask; dev sets, {evaluation.get('selection', '')}.",
        "",
        "| task | metric | value | learning rate | seeds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['column']} | {r['metric']} | {r['value']:.1f} | {r['lr']:g} | {', '.join(map(str, r['seeds']))} |"
        for r in evaluation["rows"]
    ]
    return "\n".join(lines)


def _loading_section(name: str, pipeline_tag: str, config: dict) -> str:
    example = {"fill-mask": '"Paris is the [MASK] of France."', "text-classification": '"a gripping film."'}
    call = example.get(pipeline_tag, 'question="Who?", context="Ada wrote it."')
    return "\n".join(
        [
            "## How to load",
            "",
            "With transformers alone: the model code (`sparsebert_*.py`, generated from the `sparsebert` package) "
            "is in this folder, and `trust_remote_code=True` lets transformers run it:",
            "",
            "```python",
            f"from transformers import {AUTO_CLASS[pipeline_tag]}, pipeline",
            "",
            f'model = {AUTO_CLASS[pipeline_tag]}.from_pretrained("{name}", trust_remote_code=True)',
            f'run = pipeline("{pipeline_tag}", model="{name}", trust_remote_code=True)',
            f"run({call})",
            "```",
            "",
            "With `sparsebert` installed, `import sparsebert` first and leave out `trust_remote_code`: the package's "
            "own classes load it. Without either, transformers refuses to load it. Do not load it as a plain "
            "`Bert*` model: that silently drops the mask and computes a different, dense model. The attention "
            "backend `auto` picks FlexAttention only for inference on a GPU (compiled by `torch.compile`, with the "
            'Triton of PyTorch\'s CUDA wheels); `attention_backend="flex"` on a CPU needs a C++ compiler.',
        ]
    )


def _metadata(
    config: dict,
    run: dict | None,
    evaluation: dict | None,
    finetune: dict | None,
    pipeline_tag: str,
    name: str,
) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    pattern = config["attention_pattern"]["name"]
    datasets = [
        s["name"]
        for s in (run or {}).get("data", {}).get("manifest", {}).get("sources", [])
        if s.get("type") == "huggingface"
    ]
    results = [
        EvalResult(task_type=r["task_type"], dataset_type=r["dataset"], dataset_name=r["dataset_name"],
                   dataset_config=r.get("config"), dataset_split=r["split"], metric_type=r["metric"],
                   metric_value=round(r["value"], 2))
        for r in [*(evaluation or {}).get("rows", []), *(finetune or {}).get("results", [])]
    ]  # fmt: skip
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["sparsebert", "bert", "sparse-attention", pattern.replace("_", "-"), "custom_code"],
        datasets=datasets or None,
        model_name=_short_name(name) if results else None,
        eval_results=results or None,
    )
    return data.to_yaml() + "\n"


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the model card reads it") from None
