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
from dataclasses import Field, fields
from typing import Any, get_args, get_type_hints

from data_prep.options import PrepOptions

_FIELDS = [f for f in fields(PrepOptions) if f.metadata["cli"] is not False]
_HINTS = get_type_hints(PrepOptions)

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
    """The command line: ``--input``, ``--output``, ``--hf-column``, ``--quiet`` and one flag per field of
    ``PrepOptions`` (its help, default, choices and group)."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn text into a BERT pre-training corpus: a tokenizer directory, Parquet shards of "
        "a fixed number of samples and a manifest.json, in parallel on Ray. The output is identical for the "
        "same input and seed whatever the number of workers.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {
        name: p.add_argument_group(name) for name in dict.fromkeys(f.metadata["group"] for f in _FIELDS)
    }
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
        required=True,
        metavar="DIR",
        help="directory to create (must not exist or be empty): a local path, or s3://bucket/path or "
        "gs://bucket/path (pip install -e '.[s3]'; built locally under $SPARSEBERT_CACHE, then uploaded with "
        "manifest.json last)",
    )
    exclusive: dict[str, Any] = {}
    for f in _FIELDS:
        group = groups[f.metadata["group"]]
        if f.metadata["exclusive"]:
            if f.metadata["group"] not in exclusive:
                exclusive[f.metadata["group"]] = group.add_mutually_exclusive_group()
            group = exclusive[f.metadata["group"]]
        group.add_argument(_flag(f), **_argument(f))
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


def _flag(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _argument(f: Field) -> dict[str, Any]:
    """``add_argument`` keywords for a field: its help and default (in the flag's unit), typed."""
    meta = f.metadata
    default = f.default / meta["scale"] if meta["scale"] else f.default
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"]}
    if isinstance(f.default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    else:
        kinds = [k for k in get_args(_HINTS[f.name]) or (_HINTS[f.name],) if k is not type(None)]
        kwargs |= {"type": float if meta["scale"] else kinds[0], "metavar": meta["metavar"]}
        kwargs["choices"] = meta["choices"]
    if f.default is True:
        kwargs["help"] += f" (default: {_flag(f)})"
    elif not (f.default is None or f.default is False or f.default == ()):
        kwargs["help"] += (
            f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        )
    if isinstance(meta["cli"], dict):
        kwargs |= meta["cli"]
    return kwargs


def options_from_args(args: argparse.Namespace) -> PrepOptions:
    """The ``PrepOptions`` a parsed command line asks for."""
    values = {f.name: getattr(args, f.name) for f in _FIELDS}
    for f in _FIELDS:
        if f.metadata["scale"]:
            values[f.name] = int(values[f.name] * f.metadata["scale"])
    values["hf_datasets"] = [
        tokens
        if args.hf_column is None or any(t.startswith("column=") for t in tokens)
        else [*tokens, f"column={args.hf_column}"]
        for tokens in args.hf_datasets
    ]
    values["progress"] = args.progress and not args.quiet
    return PrepOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if not args.input and not args.hf_datasets:
        print("error: give --input PATH... and/or --hf-dataset NAME", file=sys.stderr)
        return 2
    from sparsebert.storage import UnsupportedLocation, parse

    try:
        parse(args.output, "--output")
    except UnsupportedLocation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Ray's notice that a local cluster has token authentication on: it stays on, the notice needs no action.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from data_prep.pipeline import prepare_corpus

    try:
        manifest = prepare_corpus(args.input, args.output, options_from_args(args))
    except (ValueError, OSError) as exc:  # the inputs, the settings, the output (local or object storage)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("counts", "skipped", "repaired")}
    summary["tokenizer"] = {k: manifest["tokenizer"][k] for k in ("source", "vocab_size", "hash")}
    held = manifest.get("validation")
    wrote = f"{manifest['counts']['samples']} samples, {manifest['counts']['shards']} shards"
    if held:
        summary["validation"] = held["counts"]
        wrote += f"; validation: {held['counts']['samples']} samples, {held['counts']['shards']} shards"
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output} ({wrote})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
