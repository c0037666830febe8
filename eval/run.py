"""Command line: fine-tune checkpoints on GLUE/SQuAD in parallel on Ray, log to MLflow, print the paper's table.

    python -m eval.run --checkpoint runs/star/final runs/dam_s/final --tasks glue --glue-dir data/glue \\
        --lrs 2e-5,3e-5,5e-5 --seeds 1,2,3,4,5

``--no-ray`` runs the same jobs one after another in this process (one GPU, or the CPU), with the same records.
Every flag is a key of :class:`eval.options.EvalOptions`: ``--config FILE.yaml`` reads them from a file (flags
override it) and ``--help-config`` lists them with their values.

Fine-tuned models are kept in ``--output``/models/ (``--save-models best``: the run each number of the table comes
from; listed in models.csv), each loadable with transformers alone and described by its model card;
``python -m eval.predict`` runs one on new text.

Exit status: 0 when every job finished, 1 when some still failed after retries (the table shows the rest) or an
upload to the Hub failed, 2 for a bad option or input (one line, before Ray starts).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from eval.inputs import check_inputs
from eval.jobs import FinetuneConfig
from eval.options import EvalOptions
from sparsebert import console, schema

PROG = "python -m eval.run"


def build_parser() -> argparse.ArgumentParser:
    """``--config``, ``--help-config``, ``-v`` and one flag per key of :class:`EvalOptions` (derived from it)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    schema.add_config_flags(p)
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print every library message and progress bar"
    )
    schema.add_flags(p, EvalOptions)
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The defaults, then ``--config``'s keys, then the flags given; a bad value is a ConfigError naming it."""
    values: dict[str, Any] = schema.read_yaml(args.config) if args.config else {}
    return EvalOptions.from_dict(values | schema.flag_values(EvalOptions, args))


def check_backend(name: str) -> str:
    """``name`` if it is an attention backend the model knows (registered ones too), else a ``ConfigError`` (a
    ``ValueError``) naming ``--attention-backend``: the check every option source gets."""
    return FinetuneConfig(attention_backend=name).attention_backend


def check_options(options: EvalOptions) -> None:
    """Everything a run needs that can be checked before Ray starts and jobs fan out: the options are complete,
    each local checkpoint exists, and every input the tasks read is there and parses."""
    options.check_runnable()
    for ckpt in options.checkpoint:  # an id like org/name means the hub
        if not Path(ckpt).exists() and (ckpt.startswith((".", "/", "~")) or ckpt.count("/") > 1):
            raise FileNotFoundError(f"checkpoint {ckpt} not found")
    check_inputs(list(options.checkpoint), options.task_names, options.data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        if args.help_config:
            print(schema.describe(options, f"{args.config} and the flags given" if args.config else None))
            return 0
        check_options(options)
    except (OSError, ValueError) as err:  # a bad option (ConfigError), a missing or malformed input
        return console.usage_error(err, PROG)
    from eval.runner import run_evaluation  # after the checks: --help and bad arguments answer at once

    console.quiet_libraries(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    outcome = run_evaluation(options)
    print(outcome.markdown)
    print(
        f"{outcome.ran} jobs run, {outcome.skipped} already recorded; table in {outcome.output_dir}/results.md"
    )
    if outcome.kept:
        best = sum(m.best for m in outcome.kept)
        print(
            f"{len(outcome.kept)} fine-tuned models kept ({best} reported by the table): {outcome.output_dir}/models.csv"
        )
    for f in outcome.failures:
        print(
            f"FAILED after {f.attempts} attempts: {f.job.checkpoint} {f.job.key}: {f.error}", file=sys.stderr
        )
    for error in outcome.hub_errors:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    return 1 if outcome.failures or outcome.hub_errors else 0


if __name__ == "__main__":
    sys.exit(main())
