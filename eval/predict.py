"""Run a fine-tuned model (one ``eval.run`` kept, or any text-classification folder) on new text.

    python -m eval.predict eval_results/models/star-0123abcd/sst2/lr=2e-05_seed=3 --input reviews.tsv

The input has one example a line: the text, or for a pair task (MNLI, RTE, ...) the two texts separated by a tab.
The output (``--output``, else stdout) is a TSV: the prediction (the task's label, or a score for STS-B), its
probability, then the input's columns. Texts are tokenized as fine-tuning did (its sequence length, padded to it,
so the sparse mask is the one the model was scored with); a kept model's ``finetuning.json`` names its task and
length. Exit status 2 for a bad argument or input (one line).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path

from eval.tasks import TASKS, TaskSpec
from sparsebert import console

PROG = "python -m eval.predict"
_RECORD = (
    "finetuning.json"  # sparsebert.export.card.FINETUNE_FILE, read without importing the package's torch
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a fine-tuned model folder (eval.run's models/...) or Hub id")
    p.add_argument(
        "--input", required=True, metavar="FILE.tsv", help="one example a line (pairs: tab-separated)"
    )
    p.add_argument("--task", help="the task it was fine-tuned on; default: the one its finetuning.json names")
    p.add_argument("--output", metavar="FILE.tsv", help="where the predictions go; default: stdout")
    p.add_argument(
        "--max-seq-len", type=int, help="default: the fine-tuning length (finetuning.json), else 128"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code the model brings that is not sparsebert's (a pattern its config names by module)",
    )
    return p


def resolve(model: str, task: str | None, max_seq_len: int | None) -> tuple[TaskSpec, int]:
    """The task and sequence length: given, or read from the model's ``finetuning.json``; they must agree."""
    record_path = Path(model) / _RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    recorded = record.get("task")
    if task is None and recorded is None:
        raise ValueError(f"{model} names no task (no {_RECORD}): give --task")
    if task is not None and recorded is not None and task != recorded:
        raise ValueError(f"--task {task}: {model} was fine-tuned on {recorded}")
    name = task or recorded
    if name not in TASKS or TASKS[name].kind != "glue":
        glue = [t for t, spec in TASKS.items() if spec.kind == "glue"]
        raise ValueError(f"--task {name!r}: one of {', '.join(glue)} (SQuAD: a question-answering pipeline)")
    return TASKS[name], max_seq_len or int(record.get("max_seq_len") or 128)


def read_input(path: str, task: TaskSpec) -> list[list[str]]:
    """The examples: one text each, or two for a pair task; a line with the wrong number of fields is an error."""
    want = 2 if task.pair else 1
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != want:
                raise ValueError(
                    f"{path}:{number}: {len(fields)} tab-separated fields, {task.name} takes {want} a line"
                )
            rows.append(fields)
    if not rows:
        raise ValueError(f"{path} holds no example")
    return rows


def predict(
    model_dir: str, task: TaskSpec, rows: list[list[str]], max_len: int, batch_size: int, trust: bool
):
    """(prediction, probability) per row: label names (or scores, for regression), in input order."""
    import torch
    import transformers

    import sparsebert  # noqa: F401  registers the SparseBERT classes with the Auto classes

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, trust_remote_code=trust
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        second = [r[1] for r in batch] if len(batch[0]) == 2 else None
        enc = tokenizer([r[0] for r in batch], second, truncation=True, max_length=max_len,
                        padding="max_length", return_tensors="pt").to(device)  # fmt: skip
        with torch.no_grad():
            logits = model(**enc).logits.float().cpu()
        if task.labels is None:
            out += [(f"{v:.6g}", "") for v in logits[:, 0].tolist()]
            continue
        probs = logits.softmax(-1)
        for p, i in zip(probs.max(-1).values.tolist(), logits.argmax(-1).tolist(), strict=True):
            out.append((model.config.id2label.get(i, str(i)), f"{p:.4f}"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        task, max_len = resolve(args.model, args.task, args.max_seq_len)
        rows = read_input(args.input, task)
    except (OSError, ValueError) as err:
        return console.usage_error(err, PROG)
    results = predict(args.model, task, rows, max_len, args.batch_size, args.trust_remote_code)
    with contextlib.ExitStack() as stack:
        stream = (
            stack.enter_context(open(args.output, "w", newline="", encoding="utf-8"))
            if args.output
            else sys.stdout
        )
        writer = csv.writer(stream, delimiter="\t", lineterminator="\n")
        writer.writerow(
            ["prediction", "probability", *(["text_a", "text_b"] if len(rows[0]) == 2 else ["text"])]
        )
        for (label, prob), row in zip(results, rows, strict=True):
            writer.writerow([label, prob, *row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
