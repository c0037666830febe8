"""Two small fine-tuning tasks made from the embedded corpus (Python's documentation), for a study on a laptop:
labels that carry signal, data that needs no download.

* ``docs_order`` (column "Order"): is this sentence as the documentation wrote it (1), or with its inner words
  shuffled (0)? The first and last words stay in place and the words are the same, so only word order tells:
  the task needs attention between positions.
* ``docs_topic`` (column "Topic"): do these two sentences come from the same documentation topic (1) or from
  two different ones (0)? The evidence is spread over both segments: attention across them.

Train and dev sentences come from disjoint halves of every topic's sentences. :func:`write_tasks` writes them in
the GLUE layout (``<root>/DocsOrder/{train,dev}.tsv``, ``<root>/DocsTopic/...``), the same bytes every time; the
tasks are registered with the evaluation's task registry when this module is imported.
"""

from __future__ import annotations

import hashlib
import random
import re
import tempfile
from pathlib import Path

from eval.metrics import accuracy
from eval.tasks import TASKS, GlueTsvLayout, TableColumns, TaskSpec, register_task

TRAIN_PER_TASK, DEV_PER_TASK = 1600, 400
TASK_DIRS = {"docs_order": "DocsOrder", "docs_topic": "DocsTopic"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[\"'“‘(]*[A-Za-z][A-Za-z'’-]*[\"'”’)]*[.,;:!?]?[\"'”’)]*$")
_MARKER = ".complete"  # written last: a directory with it holds both splits

SPECS = (
    TaskSpec(
        name="docs_order", kind="glue", dir_name=TASK_DIRS["docs_order"], labels=("0", "1"),
        tsv=GlueTsvLayout("sentence", None, "label"), headline=("accuracy",), metrics={"accuracy": accuracy},
        table=TableColumns("Order", (("Order", "accuracy"),)),
    ),
    TaskSpec(
        name="docs_topic", kind="glue", dir_name=TASK_DIRS["docs_topic"], labels=("0", "1"),
        tsv=GlueTsvLayout("sentence1", "sentence2", "label"), headline=("accuracy",),
        metrics={"accuracy": accuracy}, table=TableColumns("Topic", (("Topic", "accuracy"),)),
    ),
)  # fmt: skip
for _spec in SPECS:
    if _spec.name not in TASKS:
        register_task(_spec)


def write_tasks(root: str | Path, seed: int = 0) -> Path:
    """Both tasks' train and dev files under ``root`` (kept when already complete); returns ``root``."""
    root = Path(root)
    if all((root / d / _MARKER).is_file() for d in TASK_DIRS.values()):
        return root
    topics = _topic_sentences()
    rng = random.Random(seed)
    pools = {"train": [], "dev": []}  # per topic: (train half, dev half)
    for sentences in topics:
        # A sentence's half is fixed by its text alone, so adding a topic never moves another's sentences.
        dev = [s for s in sentences if _digest(s) % 4 == 0]
        train = [s for s in sentences if _digest(s) % 4 != 0]
        pools["train"].append(train)
        pools["dev"].append(dev)
    sizes = {"train": TRAIN_PER_TASK, "dev": DEV_PER_TASK}
    for split, pool in pools.items():
        _write(
            root / TASK_DIRS["docs_order"] / f"{split}.tsv",
            ["sentence", "label"],
            _order_rows(pool, sizes[split], rng),
        )
        _write(root / TASK_DIRS["docs_topic"] / f"{split}.tsv", ["sentence1", "sentence2", "label"],
               _topic_rows(pool, sizes[split], rng))  # fmt: skip
    for directory in TASK_DIRS.values():
        (root / directory / _MARKER).write_text("")
    return root


def _topic_sentences() -> list[list[str]]:
    """Every topic's usable sentences: prose of 8 to 40 words, most of them words (not code)."""
    from data_prep import write_python_docs_corpus

    with tempfile.TemporaryDirectory() as tmp:
        text = write_python_docs_corpus(Path(tmp) / "docs.txt").read_text(encoding="utf-8")
    topics = []
    for document in text.split("\n\n"):
        sentences = [
            s.strip()
            for line in document.splitlines()
            for s in _SENTENCE_END.split(line)
            if _prose(s.strip())
        ]
        if len(sentences) >= 4:  # a topic-pair needs two sentences of it in each half
            topics.append(sentences)
    return topics


def _prose(sentence: str) -> bool:
    words = sentence.split()
    return (
        8 <= len(words) <= 40
        and "\t" not in sentence
        and sum(map(bool, map(_WORD.match, words))) >= 0.8 * len(words)
    )


def _order_rows(pool: list[list[str]], count: int, rng: random.Random) -> list[list[str]]:
    sentences = [s for topic in pool for s in topic]
    rng.shuffle(sentences)
    rows = []
    for i, sentence in enumerate(sentences[:count]):
        if i % 2:
            rows.append([sentence, "1"])
            continue
        words = sentence.split()
        inner = words[1:-1]
        while inner == words[1:-1]:  # a shuffle that changed nothing is no negative
            rng.shuffle(inner)
        rows.append([" ".join([words[0], *inner, words[-1]]), "0"])
    return rows


def _topic_rows(pool: list[list[str]], count: int, rng: random.Random) -> list[list[str]]:
    usable = [topic for topic in pool if len(topic) >= 2]
    rows = []
    for i in range(count):
        first = rng.randrange(len(usable))
        a = rng.choice(usable[first])
        if i % 2:
            b = rng.choice([s for s in usable[first] if s != a])
            rows.append([a, b, "1"])
        else:
            other = rng.choice([t for t in range(len(usable)) if t != first])
            rows.append([a, rng.choice(usable[other]), "0"])
    return rows


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join("\t".join(row) + "\n" for row in [header, *rows]), encoding="utf-8")
    partial.replace(path)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big")
