"""Packing and the document mask on CPU: the share of padding each packing leaves, and useful (non-padding)
tokens per second of training.

    python benchmarks/bench_packing.py                 # full size: writes results/packing_cpu.md
    python benchmarks/bench_packing.py --smoke         # a few batches: proves it runs; writes nothing

The demo corpus (Python's documentation) is prepared at ``--seq-len`` with each packing: ``nsp`` (BERT's sentence
pairs, the "before"), ``full_sentences`` (RoBERTa's, whole sentences across documents) and ``padding_free``
(the text cut into full samples); the last two also with ``data.document_mask`` (attention kept inside
documents). Padding share: padded positions over all positions of the training split. Useful tokens/s: a
BERT-mini training step (forward + backward + AdamW, MLM, and NSP for ``nsp``) over ``--batches`` batches in
turn, each variant's step right after an ``nsp`` step (``common.time_paired``); non-padding tokens per batch
over the median step time, and ``× nsp`` the median of the paired ratios scaled by the useful tokens.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, markdown_table, median, time_paired
from steering import RESULTS, demo_corpus, header, model_for, reader

from sparsebert.data import model_inputs

MINI = (4, 256, 4)
VARIANTS = [  # (row, packing, document mask)
    ("nsp", "nsp", False),
    ("full_sentences", "full_sentences", False),
    ("full_sentences + document mask", "full_sentences", True),
    ("padding_free", "padding_free", False),
    ("padding_free + document mask", "padding_free", True),
]


def padding_share(corpus: Path, batch: int) -> float:
    """Padded positions over all positions in one epoch of the training split."""
    kept = total = 0
    for data in reader(corpus, batch, epochs=1):
        kept += int(data["attention_mask"].sum())
        total += data["attention_mask"].numel()
    return 1 - kept / total


def step_fn(corpus: Path, documents: bool, nsp: bool, args):
    """A training step over ``args.batches`` batches in turn, and the mean non-padding tokens per batch."""
    stream = iter(reader(corpus, args.batch, documents=documents))
    batches = [model_inputs(next(stream), nsp=nsp) for _ in range(args.batches)]
    useful = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    torch.manual_seed(0)
    model = model_for(corpus, MINI, "dense", args.seq_len).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cycle = itertools.cycle(batches)

    def step() -> None:
        model(**next(cycle)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, useful


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparsebert" / "bench")
    parser.add_argument("--smoke", action="store_true", help="a few batches; writes no results file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.repeats, args.batch = 2, 1, 4
    start = header(torch.device("cpu"))
    steps, useful, padding = {}, {}, {}
    for name, packing, documents in VARIANTS:
        corpus = demo_corpus(args.cache, packing, args.seq_len)
        padding[name] = padding_share(corpus, args.batch)
        steps[name], useful[name] = step_fn(corpus, documents, packing == "nsp", args)
    samples, ratios = time_paired(steps, "nsp", torch.device("cpu"), args.repeats, warmup=1)
    rows = []
    for name, *_ in VARIANTS:
        per_second = useful[name] / median(samples[name])
        gain = median(ratios[name]) * useful[name] / useful["nsp"] if name in ratios else 1.0
        rows.append([name, padding[name], useful[name], per_second, gain])
    body = markdown_table(
        ["packing", "padding share", "useful tokens / batch", "useful tokens/s", "× nsp"], rows
    )
    print(body)
    if not args.smoke:
        settings = f"BERT-mini, L = {args.seq_len}, batch {args.batch}, {args.batches} batches, {args.repeats} repeats"
        text = f"# Packing and the document mask (CPU)\n\n{start}\nLoad: {load_average()} (end)\n\n{settings}\n\n{body}\n"
        (RESULTS / "packing_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
