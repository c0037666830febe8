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
from dataclasses import replace
from typing import Any

from data_prep.options import PrepOptions
from sparsebert import schema
from sparsebert.schema import ConfigError

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
    """The command line: ``--input``, ``--output``, ``--config``, ``--help-config``, ``--hf-column``, ``--quiet``
    and one flag per field of ``PrepOptions`` (derived from the field: its help, default, choices and group)."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn text into a BERT pre-training corpus: a tokenizer directory, Parquet shards of "
        "a fixed number of samples and a manifest.json, in parallel on Ray. The output is identical for the "
        "same input and seed whatever the number of workers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schema.add_config_flags(p)
    groups = {name: p.add_argument_group(name) for name in ("input", "output")}
    groups["input"].add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help=".txt (documents separated by blank lines), .jsonl or .parquet files, directories "
        "(searched recursively) or globs",
    )
    groups["output"].add_argument(
        "--output",
        metavar="DIR",
        help="directory to create (must not exist or be empty): a local path, or s3://bucket/path or "
        "gs://bucket/path (pip install -e '.[s3]'; built locally under $SPARSEBERT_CACHE, then uploaded with "
        "manifest.json last); required",
    )
    schema.add_flags(p, PrepOptions, groups)
    groups["input"].add_argument(
        "--hf-column",
        default=None,
        metavar="COL",
        help="text column of the hub datasets that do not say column=... (default: --text-column)",
    )
    groups["execution"].add_argument(
        "--quiet", action="store_true", help="print only errors and the final manifest summary"
    )
    return p


def options_from_args(args: argparse.Namespace) -> PrepOptions:
    """The ``PrepOptions`` a parsed command line asks for: the defaults, then ``--config``'s keys, then the flags
    given. Raises :class:`~sparsebert.schema.ConfigError` naming the key (and flag) of a bad value."""
    values: dict[str, Any] = schema.read_yaml(args.config) if args.config else {}
    values |= schema.flag_values(PrepOptions, args)
    options = schema.build(PrepOptions, values)
    if args.hf_column is not None:
        sources = tuple(s if s.column else replace(s, column=args.hf_column) for s in options.hf_datasets)
        options = replace(options, hf_datasets=sources)
    return replace(options, progress=False) if args.quiet else options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        if args.help_config:
            given = (
                f"{args.config} and the flags given" if args.config else "the defaults and the flags given"
            )
            print(schema.describe(options, given))
            return 0
        _check_locations(args, options)
    except ValueError as exc:  # a setting (ConfigError), a location (UnsupportedLocation)
        return _usage_error(exc)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    # Ray's notice that a local cluster has token authentication on: it stays on, the notice needs no action.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from data_prep.pipeline import prepare_corpus

    try:
        manifest = prepare_corpus(args.input, args.output, options)
    except (ValueError, OSError) as exc:  # the inputs, the settings, the output (local or object storage)
        return _usage_error(exc)
    _print_summary(manifest, args.output)
    return 0


def _check_locations(args: argparse.Namespace, options: PrepOptions) -> None:
    """Something to read and a place to write that ``sparsebert.storage`` knows, before any work."""
    if not args.input and not options.hf_datasets:
        raise ConfigError("give --input PATH... and/or --hf-dataset NAME")
    if not args.output:
        raise ConfigError("give --output DIR: where the corpus goes")
    from sparsebert.storage import parse  # pyarrow's filesystems: not for --help

    parse(args.output, "--output")


def _usage_error(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _print_summary(manifest: dict[str, Any], output: str) -> None:
    summary = {k: manifest[k] for k in ("counts", "skipped", "repaired")}
    summary["tokenizer"] = {k: manifest["tokenizer"][k] for k in ("source", "vocab_size", "hash")}
    held = manifest.get("validation")
    wrote = f"{manifest['counts']['samples']} samples, {manifest['counts']['shards']} shards"
    if held:
        summary["validation"] = held["counts"]
        wrote += f"; validation: {held['counts']['samples']} samples, {held['counts']['shards']} shards"
    print(json.dumps(summary, indent=2))
    print(f"wrote {output} ({wrote})")


if __name__ == "__main__":
    raise SystemExit(main())
