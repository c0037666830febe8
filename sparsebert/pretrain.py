"""Pre-train SparseBERT under DeepSpeed: ``deepspeed [--hostfile cluster/hosts] sparsebert/pretrain.py``.

With no arguments it runs the embedded demo (a tiny model, a DAM_s search then a frozen stage, on the
Python documentation text, on CPU, in about two minutes). ``--config PRESET_OR_YAML`` picks a training config;
``dotted.key=value`` arguments override it; ``--help-config`` lists every key with the value it would take.

This file is the command line: ``--help``, ``--help-config`` and config errors answer before torch, transformers
and DeepSpeed are imported. The run itself reads top to bottom in :mod:`sparsebert.train.trainer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (
    None,
    "",
):  # run as a script (the deepspeed launcher does this): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsebert import console
from sparsebert.train.config import DEFAULT_PRESET, ConfigError, describe, load_config, presets


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    console.quiet_libraries(args.verbose)
    source = args.config or DEFAULT_PRESET
    try:
        config = load_config(source, args.overrides)
        if args.help_config:
            print(describe(config, source))
            return 0
        from sparsebert.train import trainer  # torch, transformers, DeepSpeed: only once there is a run to do

        return trainer.pretrain(config)
    except ConfigError as err:  # the config, or a file it names (DeepSpeed JSON, a checkpoint's config)
        return console.usage_error(err)
    except console.Stopped as stop:  # a set-up error, printed once by the rank it happened on (agreement)
        return stop.code


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=f"presets: {', '.join(presets())}. Example: model.attention_pattern=star train.max_steps=50",
    )
    parser.add_argument("--config", help=f"preset name or YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key: its value in this config and its meaning",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every library message and progress bar"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
