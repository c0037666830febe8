"""Sentence splitters compared on accuracy and speed, offline, on four corpora.

    python benchmarks/bench_sentence_split.py [--docs 600] [--out benchmarks/results/sentence_split_cpu.md]

Corpora: the Python documentation (``data_prep.write_python_docs_corpus``; no ground truth, so only the
count is shown), and three generated ones whose boundaries are known (``data_prep.synthetic``):
reference-style text whose sentences start in lower case, caseless Chinese-like text ended by ``。！？``,
and capitalised English-like prose with titles, initials, ``e.g.`` and decimals.

Splitters: ``rules`` (data_prep's former hand-written splitter), ``blingfire``, NLTK ``punkt`` trained
unsupervised on the corpus itself (``PunktTrainer``; its training time is listed apart), ``pysbd`` and
``sentencex``. Every splitter sees the same lines (lines are boundaries in data_prep already).
Accuracy is the F1 of the sentence ends inside a line (a line's end is a boundary for every splitter);
speed is megabytes of text split per second on one core, the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data_prep import synthetic
from data_prep.pydocs import write_python_docs_corpus

Splitter = Callable[[str], list[str]]


def _ends(line: str, sentences: list[str]) -> set[int]:
    """Character offsets inside ``line`` where a sentence of ``sentences`` ends (the line's end excluded)."""
    ends, cursor = set(), 0
    for sentence in sentences:
        sentence = sentence.strip()
        if not sentence:
            continue
        at = line.find(sentence, cursor)
        if at < 0:  # a splitter that rewrote the text: fall back on its length
            at = cursor
        cursor = at + len(sentence)
        ends.add(cursor)
    ends.discard(len(line.rstrip()))
    return ends


def _truth(docs: synthetic.Corpus) -> list[tuple[str, set[int]]]:
    sep, lines = synthetic.joiner(docs), []
    for doc in docs:
        for sentences in doc:
            lines.append((sep.join(sentences), _ends(sep.join(sentences), sentences)))
    return lines


def splitters(training_text: str, language: str) -> tuple[dict[str, Splitter], dict[str, float]]:
    """The candidates, ready to split; and the seconds each needed to get ready (Punkt's training)."""
    # Compared here only (installed by hand): blingfire, nltk, pysbd; sentencex is a dependency.
    import blingfire
    import pysbd
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer
    from sentencex import segment

    from data_prep.text import split_sentences

    start = time.perf_counter()
    trainer = PunktTrainer()
    trainer.train(training_text, finalize=True)
    punkt = PunktSentenceTokenizer(trainer.get_params())
    punkt_seconds = time.perf_counter() - start
    sbd = pysbd.Segmenter(language=language, clean=False)
    return {
        "rules (former)": lambda line: split_sentences(line, cased=line != line.lower()),
        "blingfire": lambda line: blingfire.text_to_sentences(line).split("\n"),
        "punkt (trained on the corpus)": punkt.tokenize,
        "pysbd": sbd.segment,
        "sentencex": lambda line: list(segment(language, line)),
    }, {"punkt (trained on the corpus)": punkt_seconds}


def measure(lines: list[tuple[str, set[int] | None]], split: Splitter, repeats: int) -> dict[str, float]:
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predicted = [split(line) for line, _ in lines]
        seconds = min(seconds, time.perf_counter() - start)
    count = sum(max(1, len([s for s in p if s.strip()])) for p in predicted)
    result = {"sentences": count, "mb_s": sum(len(line.encode()) for line, _ in lines) / seconds / 1e6}
    if lines[0][1] is not None:
        tp = fp = fn = 0
        for (line, truth), sentences in zip(lines, predicted, strict=True):
            ends = _ends(line, sentences)
            tp, fp, fn = tp + len(ends & truth), fp + len(ends - truth), fn + len(truth - ends)
        precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
        result["f1"] = 2 * precision * recall / max(1e-9, precision + recall)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=600, help="documents per generated corpus (default 600)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the fastest counts (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pydocs = write_python_docs_corpus(tmp + "/").read_text(encoding="utf-8").split("\n\n")
    corpora: dict[str, tuple[list[tuple[str, set[int] | None]], int | None, str]] = {
        "Python docs": ([(ln, None) for d in pydocs for ln in d.split("\n") if ln.strip()], None, "en")
    }
    for name, make, language in (
        ("lower-case starts", synthetic.lowercase_corpus, "en"),
        ("caseless (Chinese-like)", synthetic.caseless_corpus, "zh"),
        ("English prose", synthetic.prose_corpus, "en"),
    ):
        docs = make(args.docs, seed=1)
        corpora[name] = (_truth(docs), synthetic.sentence_count(docs), language)

    lines_out = [
        "| corpus | true sentences | splitter | sentences found | count error | boundary F1 | MB/s | ready in s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for corpus, (lines, truth, language) in corpora.items():
        candidates, ready = splitters("\n\n".join(line for line, _ in lines), language)
        for name, split in candidates.items():
            r = measure(lines, split, args.repeats)
            error = f"{(r['sentences'] - truth) / truth:+.1%}" if truth else ""
            f1 = f"{r['f1']:.3f}" if "f1" in r else ""
            lines_out.append(
                f"| {corpus} | {truth or 'unknown'} | {name} | {r['sentences']:,} | {error} | {f1} | "
                f"{r['mb_s']:.2f} | {ready.get(name, 0):.2f} |"
            )
            print(lines_out[-1], flush=True)
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    header = (
        f"Machine: {os.cpu_count()}-core CPU, Python {platform.python_version()}, one process; "
        f"{args.docs} documents per generated corpus; fastest of {args.repeats} runs; 1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share the CPUs).\n"
        f"Command: `{command}`\n"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Sentence splitters: accuracy and speed\n\n{header}\n" + "\n".join(lines_out) + "\n",
            encoding="utf-8",
        )
    print(header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
