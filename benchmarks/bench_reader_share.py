"""Bytes and rows each rank reads from the shards in one epoch, world sizes simulated in one process.

    python benchmarks/bench_reader_share.py [--mb 8] [--shard-size 256] [--lanes 16] [--batch-size 16]
        [--world-sizes 1 2 8] [--base 070bd57] [--out benchmarks/results/reader_share_cpu.md]

*before*: ``ShardReader`` as of git commit ``--base`` (loaded from git, every rank reads every shard);
*after*: this checkout's ``ShardReader`` (each rank reads the row groups of its lanes). The corpus is the
Python-docs demo text repeated up to ``--mb`` megabytes, prepared by ``data_prep`` with ``--shard-size``
samples per shard (so the row groups hold at most that many rows). Every rank of every world size reads
one whole epoch with ``prefetch=0``; what it read is counted twice, by independent means:

* ``rchar``: the bytes the process read from files (``/proc/self/io``, Linux), both readers;
* through ``sparsebert.data.read_count.CountingFileSystem`` (the reads pyarrow makes; the current reader
  only, the old one cannot take a file system): bytes, and the rows of the row groups read.

Construction (manifest, footers, checks) is not counted: it reads the footers only, the same before and
after. The target: every rank reads at most ``1.5 / world_size`` of the corpus plus one window (a row group
per lane). Counts, not timings: the load average is recorded but does not change them.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def rchar() -> int:
    """Bytes this process has read through read()/pread() so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line: this benchmark needs Linux")


def make_corpus(root: Path, megabytes: float, shard_size: int) -> Path:
    import ray

    from data_prep import prepare_corpus, write_python_docs_corpus

    documents = write_python_docs_corpus(root / "python_docs.txt").read_text(encoding="utf-8").split("\n\n")
    rng, parts, size = random.Random(0), [], 0
    while size < megabytes * 1e6:  # the documents repeated, shuffled per copy
        copy = documents[:]
        rng.shuffle(copy)
        parts.append("\n\n".join(copy))
        size += len(parts[-1])
    text = root / "corpus.txt"
    text.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        prepare_corpus(
            [text], root / "prepared", vocab_size=4000, seq_len=128, shard_size=shard_size, progress=False
        )
    finally:
        ray.shutdown()
    return root / "prepared"


def old_reader_class(base: str, workdir: Path) -> type:
    """``ShardReader`` as of commit ``base``, loaded from git (not copied into the repository)."""
    source = subprocess.run(
        ["git", "show", f"{base}:sparsebert/data/reader.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / f"reader_at_{base}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"reader_at_{base}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.ShardReader


def epoch(reader) -> int:
    """Read one whole epoch; return the samples it yielded."""
    return sum(len(b["sample_index"]) for b in itertools.islice(iter(reader), reader.steps_per_epoch))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=8.0)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--base", default="070bd57")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--data", type=Path, help="an already prepared corpus to read (skips --mb, --shard-size)"
    )
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from sparsebert.data import ShardReader
    from sparsebert.data.read_count import CountingFileSystem

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = args.data or make_corpus(workdir, args.mb, args.shard_size)
        OldReader = old_reader_class(args.base, workdir)
        common = {"batch_size": args.batch_size, "seed": 0, "prefetch": 0}
        probe = ShardReader(data, rank=0, world_size=1, lanes=args.lanes, **common)
        n = probe.num_samples
        footers = {path: pq.read_metadata(path) for path in (Path(p.path) for p in probe._paths)}
        groups = {(p, j): md.row_group(j) for p, md in footers.items() for j in range(md.num_row_groups)}
        corpus_bytes = sum(path.stat().st_size for path in footers)
        group_bytes = max(
            sum(g.column(c).total_compressed_size for c in range(g.num_columns)) for g in groups.values()
        )
        window = args.lanes * group_bytes
        rows_per_group = max(g.num_rows for g in groups.values())

        # Warm-up, uncounted: the first epoch of each reader imports modules lazily, and rchar would count that.
        epoch(probe)
        epoch(OldReader(data, rank=0, world_size=1, **common))
        results = []
        for world in args.world_sizes:
            for name in ("before", "after"):
                per_rank = []
                for rank in range(world):
                    if name == "before":
                        reader = OldReader(data, rank=rank, world_size=world, **common)
                    else:
                        reader = ShardReader(data, rank=rank, world_size=world, lanes=args.lanes, **common)
                    start = rchar()
                    samples = epoch(reader)
                    read = rchar() - start
                    counted = rows = None
                    if name == "after":
                        counting = CountingFileSystem()
                        reader = ShardReader(
                            data, rank=rank, world_size=world, lanes=args.lanes, filesystem=counting.filesystem,
                            **common,
                        )  # fmt: skip
                        counting.reset()
                        assert epoch(reader) == samples
                        counted = counting.total
                        rows = sum(
                            groups[p, j].num_rows for p in footers for j in counting.row_groups_read(p)
                        )
                    per_rank.append((read, counted, rows, samples))
                results.append((name, world, per_rank))
                worst = max(r[0] for r in per_rank)
                print(
                    f"{name:6s} world {world}: max {worst / 1e6:.2f} MB per rank ({worst / corpus_bytes:.3f} of the corpus)"
                )

    share = "share = max over ranks of bytes read / (corpus bytes / world size)"
    lines = [
        "# Bytes read per rank in one epoch (CPU)",
        "",
        "Command: `python benchmarks/bench_reader_share.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + " (counts, not timings: the load does not change them).",
        "",
        ("Corpus: " if args.data else f"Corpus: Python-docs demo text repeated to {args.mb:g} MB; ")
        + f"{n} samples (seq_len 128) in "
        f"{len(footers)} shards, {len(groups)} row groups of <= {rows_per_group} rows; "
        f"{corpus_bytes / 1e6:.2f} MB of Parquet. Micro-batch {args.batch_size} per rank, one epoch. "
        f"*before*: `ShardReader` at `{args.base}` (windows of 4 shards); *after*: this reader with "
        f"`lanes={args.lanes}`; window = lanes x largest row group = {window / 1e6:.3f} MB.",
        "",
        "| reader | world size | MB read per rank (rchar: min / max) | share | MB per rank (counted by pyarrow.fs: max) "
        "| rows per rank (row groups read: max) | rows / (n / world size) | target: max <= 1.5 corpus/W + window |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, world, per_rank in results:
        reads = [r[0] for r in per_rank]
        share_value = max(reads) / (corpus_bytes / world)
        if name == "after":
            counted = f"{max(r[1] for r in per_rank) / 1e6:.3f}"
            rows = max(r[2] for r in per_rank)
            rows_cell, rows_share = str(rows), f"{rows / (n / world):.2f}"
        else:
            counted, rows_cell, rows_share = "n/a", f"{n} (every shard whole)", f"{world:.2f}"
        target = max(reads) <= 1.5 * corpus_bytes / world + window
        lines.append(
            f"| {name} | {world} | {min(reads) / 1e6:.3f} / {max(reads) / 1e6:.3f} | {share_value:.2f} | "
            f"{counted} | {rows_cell} | {rows_share} | {'yes' if target else 'no'} |"
        )
    lines += [
        "",
        f"{share}: 1.00 means a rank reads exactly its 1/W of the corpus; W means it reads the whole corpus. "
        "rchar counts every byte the process read from files during the epoch (Parquet column chunks, and "
        "the footer the old reader reads again per shard); the pyarrow.fs count is the bytes pyarrow requested "
        "through a counting file system, and the rows are those of the row groups whose column chunks it read.",
        "",
        "Reading the table: *before* reads more than the corpus even on one rank because its shards are smaller "
        "than pyarrow's 64 KiB speculative footer read, so `pq.read_table` reads each file once for the footer "
        "and again for the column chunks; with shards of real size that doubling vanishes and *before* reads "
        "the corpus once per rank, W times the share. *after* reads its share plus, per lane, the row groups "
        "its lane starts and ends inside (a row group cut by a lane boundary is read by both lanes): at most "
        "2 x lanes/W row groups more, i.e. the rows over 1.00. Smaller row groups shrink that excess, the "
        "memory (lanes/W decoded row groups per rank) and the mixing granularity.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
