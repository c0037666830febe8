"""Command line: ``python -m data_prep --input PATH... --output DIR [options]``.

Also runnable as a script (``ray submit cluster/prep.yaml data_prep/cli.py -- ARGS``), which is why
imports here are absolute.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from data_prep.format import PACKINGS
from data_prep.tokenizer import TOKENIZER_KINDS

_EPILOG = """\
examples:
  # local files, offline, tokenizer trained on the corpus
  python -m data_prep --input corpus/ --output data/corpus --vocab-size 30522
  # Wikipedia + BookCorpus from the hub, on a Ray cluster (see cluster/prep.yaml)
  python -m data_prep --output /mnt/shared/wiki_books --tokenizer bert-base-uncased --ray-address auto \\
      --hf-dataset wikimedia/wikipedia 20231101.en \\
      --hf-dataset bookcorpus/bookcorpus plain_text revision=refs/convert/parquet rows_per_document=256
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn text into a BERT pre-training corpus: a tokenizer directory, Parquet shards of "
        "a fixed number of samples and a manifest.json, in parallel on Ray. The output is identical for the "
        "same input and seed whatever the number of workers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input")
    src.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help=".txt (documents separated by blank lines), .jsonl or .parquet files, directories "
        "(searched recursively) or globs",
    )
    src.add_argument(
        "--text-column", default="text", help="text field of .jsonl/.parquet inputs (default: text)"
    )
    src.add_argument(
        "--doc-per-file",
        action="store_true",
        help="each .txt file is one document (default: blank lines separate documents)",
    )
    src.add_argument(
        "--rows-per-document",
        type=int,
        default=1,
        metavar="N",
        help="join N consecutive .jsonl/.parquet/hub rows into one document, for one-sentence-per-row "
        "data such as BookCorpus (default: 1)",
    )
    src.add_argument(
        "--hf-dataset",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "CONFIG|KEY=VALUE"),
        help="a Hugging Face dataset, streamed by the workers (network; only when given). Keys: "
        "split (train), column, revision, rows_per_document. Repeat for several datasets",
    )
    src.add_argument(
        "--hf-column",
        default=None,
        metavar="COL",
        help="text column of the hub datasets that do not say column=... (default: --text-column)",
    )
    src.add_argument(
        "--max-line-length",
        type=int,
        default=4_000_000,
        metavar="N",
        help="skip (and count) lines or records longer than N bytes/characters (default: 4000000)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--output", required=True, metavar="DIR", help="directory to create (must not exist or be empty)"
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it exists (only once the new one is complete)",
    )
    out.add_argument(
        "--shard-size", type=int, default=65536, metavar="N", help="samples per shard (default: 65536)"
    )

    tok = p.add_argument_group("tokenizer")
    choice = tok.add_mutually_exclusive_group()
    choice.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="use this transformers tokenizer (a local directory, or a hub name) instead of training one",
    )
    choice.add_argument(
        "--train-tokenizer",
        choices=TOKENIZER_KINDS,
        default="wordpiece",
        help="train this kind of tokenizer on the corpus (default: wordpiece)",
    )
    tok.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        metavar="N",
        help="size of a trained vocabulary (default: 8192)",
    )
    tok.add_argument(
        "--lowercase",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lower-case (uncased) when training a tokenizer (default: --lowercase)",
    )
    tok.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=256,
        metavar="MB",
        help="train the tokenizer on up to this much text, whole units in a seeded order (default: 256)",
    )

    smp = p.add_argument_group("samples")
    smp.add_argument(
        "--seq-len",
        type=int,
        default=128,
        metavar="N",
        help="tokens per sample incl. special tokens (default: 128)",
    )
    smp.add_argument(
        "--packing",
        choices=PACKINGS,
        default="nsp",
        help="nsp: BERT sentence pairs with next-sentence labels; full_sentences: RoBERTa packing "
        "without NSP (default: nsp)",
    )
    smp.add_argument(
        "--short-seq-prob",
        type=float,
        default=0.1,
        help="probability of a shorter target length (default: 0.1)",
    )
    smp.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    smp.add_argument(
        "--docs-per-group",
        type=int,
        default=1000,
        metavar="N",
        help="documents per sampling group, the pool random NSP segments come from (default: 1000)",
    )

    run = p.add_argument_group("execution")
    run.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="parallel Ray tasks (default: every CPU Ray has); does not change the output",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster ('auto' on a cluster node) instead of starting a local Ray",
    )
    run.add_argument(
        "--unit-mb",
        type=float,
        default=8,
        metavar="MB",
        help="text per unit of parallel work; part of the output's definition (default: 8)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress output")
    run.add_argument("--quiet", action="store_true", help="print only errors and the final manifest summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if not args.input and not args.hf_dataset:
        print("error: give --input PATH... and/or --hf-dataset NAME", file=sys.stderr)
        return 2
    hf = [
        tokens
        if args.hf_column is None or any(t.startswith("column=") for t in tokens)
        else [*tokens, f"column={args.hf_column}"]
        for tokens in args.hf_dataset
    ]
    from data_prep.pipeline import prepare_corpus

    try:
        manifest = prepare_corpus(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size,
            lowercase=args.lowercase,
            seq_len=args.seq_len,
            seed=args.seed,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            packing=args.packing,
            hf_datasets=hf,
            text_column=args.text_column,
            doc_per_file=args.doc_per_file,
            rows_per_document=args.rows_per_document,
            short_seq_prob=args.short_seq_prob,
            docs_per_group=args.docs_per_group,
            unit_bytes=int(args.unit_mb * (1 << 20)),
            max_line_length=args.max_line_length,
            tokenizer_sample_bytes=int(args.tokenizer_sample_mb * (1 << 20)),
            ray_address=args.ray_address,
            overwrite=args.overwrite,
            progress=not (args.no_progress or args.quiet),
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("counts", "skipped", "repaired")}
    summary["tokenizer"] = {k: manifest["tokenizer"][k] for k in ("source", "vocab_size", "hash")}
    print(json.dumps(summary, indent=2))
    print(
        f"wrote {args.output} ({manifest['counts']['samples']} samples, {manifest['counts']['shards']} shards)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
