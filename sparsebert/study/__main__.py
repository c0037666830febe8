"""A study in one command: every arm's pre-training, the fine-tuning of their exports, the table and the figures.

    python -m sparsebert.study --config tiny_study            # a preset (tiny_study, paper_table)
    python -m sparsebert.study my_study.yaml train_steps=...   # a study file, with dotted.key=value overrides
    python -m sparsebert.study my_study.yaml --dry-run         # the plan: each launch command, the job counts

The same command resumes an interrupted study and, on a finished one, prints the results. Exit status: 0 when the
study is complete (or stopped by a signal, checkpointed), 1 when an arm or evaluation jobs failed, 2 for a bad
study file or option (one line, before anything starts). docs/study.md has the file format.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sparsebert import console
from sparsebert.schema import ConfigError

PROG = "python -m sparsebert.study"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    console.quiet_libraries(args.verbose)
    try:
        from sparsebert.study.config import describe, load_study
        from sparsebert.study.runner import check_eval_data, describe_plan, prepare

        if args.help_config and not args.config and not any("=" not in w for w in args.words):
            print(describe())  # the keys, without a study
            return 0
        study = load_study(_source(args), args.overrides)
        if args.help_config:
            print(describe(study))
            return 0
        plan, place, rank = prepare(study, args.node_rank, args.allow_changes)
        if not args.dry_run and not rank:
            check_eval_data(study)
        print(describe_plan(plan, place, rank, args.dry_run), flush=True)
    except (ConfigError, OSError, ValueError) as err:  # a bad key, arm, launch block, or missing eval data
        return console.usage_error(" ".join(str(err).split()), PROG)
    if args.dry_run:
        return 0
    from sparsebert.study.runner import run_study

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s"
    )
    return run_study(plan, place, rank, ray=not args.no_ray)


def _source(args: argparse.Namespace) -> str:
    from sparsebert.study.config import presets

    files = [word for word in args.words if "=" not in word]
    args.overrides = [word for word in args.words if "=" in word]
    if len(files) + (args.config is not None) > 1:
        raise ConfigError(
            f"name one study: a file or --config, not {', '.join([*files, *filter(None, [args.config])])}"
        )
    if not files and args.config is None:
        raise ConfigError(f"name a study file, or a preset with --config ({', '.join(presets())})")
    return files[0] if files else args.config


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", metavar="PRESET", help="a preset (tiny_study, paper_table) or a study file"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    parser.add_argument(
        "--no-ray", action="store_true", help="run the fine-tuning jobs in this process, one after another"
    )
    parser.add_argument(
        "--allow-changes", action="store_true",
        help="an arm whose keys changed since it ran runs again in a new directory (the old one is kept)",
    )  # fmt: skip
    parser.add_argument(
        "--node-rank", type=int, metavar="N",
        help="with launch.no_ssh: this node's index (0 evaluates and reports), e.g. $SLURM_NODEID",
    )  # fmt: skip
    parser.add_argument("--help-config", action="store_true", help="list every key of the study file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every library message")
    parser.add_argument(
        "words", nargs="*", metavar="STUDY.yaml | key=value", help="the study file and overrides"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
