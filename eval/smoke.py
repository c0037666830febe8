"""Toy inputs for a smoke run on a laptop: a tiny SparseBERT checkpoint and GLUE/SQuAD files in the official
formats (random sentences, so the scores mean nothing; the point is that every stage runs in seconds).

    python -m eval.smoke /tmp/eval-smoke            # writes ckpt-dense/, ckpt-star/, glue/, squad/
    python -m eval.run --checkpoint /tmp/eval-smoke/ckpt-dense /tmp/eval-smoke/ckpt-star --tasks all \\
        --glue-dir /tmp/eval-smoke/glue --squad-dir /tmp/eval-smoke/squad --lrs 1e-3 --seeds 1,2 --max-steps 4 \\
        --max-seq-len 32 --squad-max-seq-len 64 --doc-stride 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

WORDS = [
    "the",
    "a",
    "an",
    "cat",
    "dog",
    "bird",
    "man",
    "woman",
    "child",
    "house",
    "car",
    "tree",
    "river",
    "city",
    "book",
    "song",
    "game",
    "food",
    "water",
    "sun",
    "moon",
    "is",
    "was",
    "has",
    "had",
    "runs",
    "ran",
    "sees",
    "saw",
    "likes",
    "liked",
    "eats",
    "ate",
    "reads",
    "read",
    "sings",
    "sang",
    "plays",
    "played",
    "big",
    "small",
    "red",
    "blue",
    "old",
    "new",
    "good",
    "bad",
    "happy",
    "sad",
    "fast",
    "slow",
    "in",
    "on",
    "at",
    "with",
    "from",
    "to",
    "of",
    "and",
    "or",
    "not",
    "what",
    "who",
    "where",
    "when",
    "why",
    "how",
    "which",
    "does",
    "did",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_checkpoint(out: str | Path, attention_pattern="dense", seed: int = 0) -> Path:
    """A 2-layer, 2-head, hidden-32 SparseBERT (pre-training heads) with a word-level vocab, saved HF-style."""
    import torch
    from transformers import BertTokenizerFast

    from sparsebert import SparseBertConfig, SparseBertForPreTraining

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + [".", ",", "?"]) + "\n")
    # transformers 5 takes the vocab file as `vocab=`; `vocab_file=` is silently ignored there.
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(out)
    torch.manual_seed(seed)
    config = SparseBertConfig(
        vocab_size=len(SPECIAL) + len(WORDS) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, attention_pattern=attention_pattern,
    )  # fmt: skip
    SparseBertForPreTraining(config).save_pretrained(out)
    return out


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, n))) + "."


def _tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def write_glue(out: str | Path, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> Path:
    """All nine GLUE tasks in the GLUE distribution's layout, each with its own columns."""
    rng = random.Random(seed)
    out = Path(out)
    for split, n in (("train", n_train), ("dev", n_dev)):
        for task, rows in _glue_split(rng, n):
            _tsv(out / task / f"{split}.tsv", rows)
    label = lambda: rng.choice(["entailment", "neutral", "contradiction"])  # noqa: E731
    s = lambda: _sentence(rng)  # noqa: E731
    _tsv(out / "MNLI" / "train.tsv", [[*_MNLI_COLUMNS, "label1", "gold_label"]]
         + [[str(i), *_MNLI_PARSES, s(), s(), (g := label()), g] for i in range(n_train)])  # fmt: skip
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        _tsv(out / "MNLI" / name, [[*_MNLI_COLUMNS, *(f"label{k}" for k in range(1, 6)), "gold_label"]]
             + [[str(i), *_MNLI_PARSES, s(), s(), *(label() for _ in range(5)), label()] for i in range(n_dev)])  # fmt: skip
    return out


_STSB_COLUMNS = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                 "score"]  # fmt: skip
_MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]  # fmt: skip
_MNLI_PARSES = ["1", "1e", "fiction", "(", "(", "(", "("]  # promptID ... sentence2_parse


def _glue_split(rng: random.Random, n: int) -> list[tuple[str, list[list[str]]]]:
    """One split of the GLUE tasks but MNLI: (directory, rows with the header if the task has one), drawn from
    ``rng`` in this order."""
    s = lambda: _sentence(rng)  # noqa: E731
    b = lambda: str(rng.randint(0, 1))  # noqa: E731
    nli = lambda: rng.choice(["entailment", "not_entailment"])  # noqa: E731
    return [
        ("CoLA", [["gj04", b(), "", s()] for _ in range(n)]),
        ("SST-2", [["sentence", "label"]] + [[s(), b()] for _ in range(n)]),
        ("MRPC", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]]
                 + [[b(), str(i), str(i + 1), s(), s()] for i in range(n)]),
        ("STS-B", [_STSB_COLUMNS] + [[str(i), "main-news", "x", "2012", str(i), "none", "none", s(), s(),
                                      f"{rng.uniform(0, 5):.3f}"] for i in range(n)]),
        ("QQP", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
                + [[str(i), str(2 * i), str(2 * i + 1), s(), s(), b()] for i in range(n)]),
        ("QNLI", [["index", "question", "sentence", "label"]] + [[str(i), s(), s(), nli()] for i in range(n)]),
        ("RTE", [["index", "sentence1", "sentence2", "label"]] + [[str(i), s(), s(), nli()] for i in range(n)]),
        ("WNLI", [["index", "sentence1", "sentence2", "label"]] + [[str(i), s(), s(), b()] for i in range(n)]),
    ]  # fmt: skip


def write_squad(out: str | Path, n_train: int = 12, n_dev: int = 8, seed: int = 0) -> Path:
    """``{train,dev}-v1.1.json`` and ``{train,dev}-v2.0.json`` with long contexts (several windows each)."""
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for version in ("1.1", "2.0"):
        for split, n in (("train", n_train), ("dev", n_dev)):
            paragraphs = []
            for p in range(n):
                context = " ".join(_sentence(rng, 10) for _ in range(8))
                answer = rng.choice(context.split()[5:-5])
                start = context.index(" " + answer + " ") + 1
                qas = [
                    {
                        "id": f"{split}-{p}",
                        "question": _sentence(rng).rstrip(".") + "?",
                        "answers": [{"text": answer, "answer_start": start}] * (2 if split == "dev" else 1),
                    }
                ]
                if version == "2.0":
                    qas[0]["is_impossible"] = False
                    qas.append(
                        {
                            "id": f"{split}-{p}-na",
                            "question": "why " + _sentence(rng).rstrip(".") + "?",
                            "answers": [],
                            "is_impossible": True,
                            "plausible_answers": [{"text": answer, "answer_start": start}],
                        }
                    )
                paragraphs.append({"context": context, "qas": qas})
            doc = {"version": f"v{version}", "data": [{"title": "Toy", "paragraphs": paragraphs}]}
            (out / f"{split}-v{version}.json").write_text(json.dumps(doc, indent=1))
    return out  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.smoke", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("out", nargs="?", default="smoke", help="directory to write into (default: smoke)")
    out = Path(parser.parse_args(argv).out)
    write_tiny_checkpoint(out / "ckpt-dense", "dense")
    write_tiny_checkpoint(out / "ckpt-star", "star")
    write_glue(out / "glue")
    write_squad(out / "squad")
    print(f"wrote {out}/ckpt-dense, {out}/ckpt-star, {out}/glue, {out}/squad")
    return 0


if __name__ == "__main__":
    sys.exit(main())
