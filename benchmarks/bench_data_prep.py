"""Tokens/s of ``data_prep`` against a plain ``datasets.map(tokenizer, batched=True)``, same text, same tokenizer.

    python benchmarks/bench_data_prep.py [--mb 32] [--workers 1 2] [--out benchmarks/results/data_prep_cpu.md]

The text is the Python documentation corpus (``data_prep.write_python_docs_corpus``) repeated, topics
shuffled per copy, up to ``--mb`` megabytes; the tokenizer is a WordPiece trained on it once. Both
pipelines start from the same ``.txt`` file and are timed end to end (reading, tokenising, writing):

* baseline: ``load_dataset("text", sample_by="paragraph")`` + ``map(tokenizer, batched=True, num_proc=N)``
* data_prep: ``prepare_corpus(..., num_workers=N)`` on an already running Ray (cluster start-up is not
  pipeline throughput; a warm-up run starts the worker processes), which also splits sentences,
  builds NSP pairs and writes fixed-size Parquet shards.

Each configuration runs ``--repeats`` times, interleaved; the fastest run counts. Tokens are text
tokens (special tokens excluded) each pipeline produced. ``TOKENIZERS_PARALLELISM``
is off so that N workers means N processes in both.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_text(path: Path, megabytes: float, seed: int = 0) -> Path:
    from data_prep import write_python_docs_corpus

    documents = (
        write_python_docs_corpus(path.parent / "python_docs.txt").read_text(encoding="utf-8").split("\n\n")
    )
    rng, target, parts, size = random.Random(seed), megabytes * (1 << 20), [], 0
    while size < target:
        rng.shuffle(documents)
        parts.extend(documents)
        size += sum(len(d) + 2 for d in documents)
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def run_baseline(text: Path, tokenizer_dir: Path, workers: int, cache: Path) -> tuple[int, float]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    ds = datasets.load_dataset(
        "text", data_files=str(text), sample_by="paragraph", split="train", cache_dir=str(cache)
    )
    ds = ds.map(
        lambda batch: tokenizer(batch["text"]), batched=True, num_proc=workers if workers > 1 else None
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) - 2 for ids in ds["input_ids"])  # minus [CLS] and [SEP]
    return tokens, seconds


def run_data_prep(text: Path, tokenizer_dir: Path, workers: int, out: Path) -> tuple[int, float]:
    from data_prep import prepare_corpus

    start = time.perf_counter()
    manifest = prepare_corpus([text], out, tokenizer=tokenizer_dir, num_workers=workers, progress=False)
    return manifest["counts"]["tokens"], time.perf_counter() - start


def cpu_name() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return match.group(1).strip() if match else platform.processor()
    except OSError:
        return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=32, help="megabytes of text (default: 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each; the fastest counts (default: 3)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    import ray

    from data_prep import prepare_corpus

    load_before = os.getloadavg()[0]
    from data_prep.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_data_prep-"))
    try:
        text = make_text(work / "corpus.txt", args.mb)
        tokenizer_dir = work / "tokenizer"
        train_tokenizer(
            [(work / "python_docs.txt").read_text(encoding="utf-8")], tokenizer_dir, vocab_size=8192
        )
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        prepare_corpus([work / "python_docs.txt"], work / "warmup", tokenizer=tokenizer_dir, progress=False)

        best: dict[tuple[str, int], tuple[int, float]] = {}
        for repeat in range(args.repeats):  # interleaved, so load from other jobs hits both pipelines alike
            for workers in args.workers:
                runs = {
                    "baseline": run_baseline(
                        text, tokenizer_dir, workers, work / f"hf-cache-{workers}-{repeat}"
                    ),
                    "data_prep": run_data_prep(
                        text, tokenizer_dir, workers, work / f"out-{workers}-{repeat}"
                    ),
                }
                for name, (tokens, seconds) in runs.items():
                    if (name, workers) not in best or seconds < best[name, workers][1]:
                        best[name, workers] = (tokens, seconds)
        rows = [(w, *best["baseline", w], *best["data_prep", w]) for w in args.workers]
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        f"Machine: {os.cpu_count()}-core CPU ({cpu_name()}), Python {platform.python_version()}; "
        f"text: {args.mb:g} MB of Python docs; tokenizer: WordPiece, 8192 tokens; fastest of {args.repeats} runs; "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share the CPUs).",
        f"Command: `{command}`",
        "",
        "| pipeline | workers | text tokens | seconds | tokens/s | data_prep / baseline |",
        "|---|---|---|---|---|---|",
    ]
    for workers, base_tokens, base_s, ours_tokens, ours_s in rows:
        ratio = (ours_tokens / ours_s) / (base_tokens / base_s)
        lines.append(
            f"| datasets.map (baseline) | {workers} | {base_tokens:,} | {base_s:.1f} | {base_tokens / base_s:,.0f} | |"
        )
        lines.append(
            f"| data_prep | {workers} | {ours_tokens:,} | {ours_s:.1f} | {ours_tokens / ours_s:,.0f} | {ratio:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# data_prep throughput vs datasets.map\n\n{table}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
