"""Command line: fine-tune checkpoints on GLUE/SQuAD in parallel on Ray, log to MLflow, print the paper's table.

    python -m eval.run --checkpoint runs/star/final runs/dam_s/final --tasks glue --glue-dir data/glue \\
        --lrs 2e-5,3e-5,5e-5 --seeds 1,2,3,4,5

``--no-ray`` runs the same jobs one after another in this process (one GPU, or the CPU), with the same records.

Exit status: 0 when every job finished, 1 when some still failed after retries (the table shows the rest).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from eval.inputs import check_inputs
from eval.jobs import DEVICES, DataSource, FinetuneConfig
from eval.tasks import TASKS, parse_tasks
from sparsebert import console


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _pattern(text: str):
    """A pattern name (``star``) or a JSON spec (``{"name": "longformer", "window": 4}``)."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="DIR",
        help="one or more model dirs (our final/ exports or any HF BERT dir); one table row each",
    )
    p.add_argument(
        "--labels", help="comma-separated row names, one per checkpoint (default: the mask's name)"
    )
    p.add_argument(
        "--tasks",
        default="glue",
        help=f"'glue' (8 tasks), 'all' (+ SQuAD v1.1, v2.0) or a comma list of: {', '.join(TASKS)}",
    )
    src = p.add_argument_group("data")
    src.add_argument(
        "--glue-dir", help="GLUE distribution dir (CoLA/, SST-2/, MNLI/, ... with train/dev TSVs)"
    )
    src.add_argument(
        "--squad-dir", help="dir with train-v1.1.json, dev-v1.1.json, train-v2.0.json, dev-v2.0.json"
    )
    src.add_argument(
        "--hub",
        action="store_true",
        help="download nyu-mll/glue, rajpurkar/squad, rajpurkar/squad_v2 instead of local files",
    )
    hp = p.add_argument_group("fine-tuning")
    hp.add_argument(
        "--lrs", type=_floats, default=[2e-5, 3e-5, 5e-5], help="comma list (default 2e-5,3e-5,5e-5)"
    )
    hp.add_argument("--seeds", type=_ints, default=[1, 2, 3, 4, 5], help="comma list (default 1,2,3,4,5)")
    hp.add_argument("--epochs", type=float, default=3.0)
    hp.add_argument("--batch-size", type=int, default=32)
    hp.add_argument("--max-seq-len", type=int, default=128, help="GLUE sequence length (default 128)")
    hp.add_argument("--squad-max-seq-len", type=int, default=384)
    hp.add_argument("--doc-stride", type=int, default=128, help="SQuAD: tokens shared by consecutive windows")
    hp.add_argument(
        "--attention-pattern",
        type=_pattern,
        help="replace the checkpoint's mask: a name or a JSON spec (default: the checkpoint's own)",
    )
    hp.add_argument(
        "--attention-backend",
        default="auto",
        metavar="NAME",
        help="auto (default) or any name in sparsebert.choices.ATTENTION_BACKENDS (eager, sdpa, flex, ...)",
    )
    hp.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPU")
    hp.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a checkpoint whose mask pattern is a 'package.module:function' path import that code",
    )
    hp.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="auto: the GPU if torch sees one (on Ray: always, when jobs get GPUs), else the CPU; "
        "cuda: fail rather than run on the CPU; cpu: never use a GPU (default auto)",
    )
    smoke = p.add_argument_group("smoke runs")
    smoke.add_argument("--max-steps", type=int, help="stop each job after this many optimizer steps")
    smoke.add_argument("--max-train-samples", type=int)
    smoke.add_argument("--max-eval-samples", type=int)
    run = p.add_argument_group("orchestration and records")
    run.add_argument(
        "--no-ray",
        dest="use_ray",
        action="store_false",
        help="run the jobs one after another in this process (no Ray needed); same records and table",
    )
    run.add_argument(
        "--ray-address", help="Ray cluster to use ('auto' on a cluster node); default: a local Ray"
    )
    run.add_argument("--max-retries", type=int, default=1, help="reruns of a failed job (default 1)")
    run.add_argument("--cpus-per-job", type=float, help="Ray CPUs per job (default 1)")
    run.add_argument("--gpus-per-job", type=float, help="default: 1 if the cluster has GPUs, else 0")
    run.add_argument(
        "--resume", action="store_true", help="skip jobs already finished and recorded in MLflow"
    )
    run.add_argument(
        "--experiment", default="sparsebert-eval", help="MLflow experiment (default sparsebert-eval)"
    )
    run.add_argument(
        "--output", default="eval_results", help="where results.md/.csv go (default eval_results/)"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print every library message and progress bar"
    )
    return p  # fmt: skip


# Settings of the Ray executor only: given with --no-ray they would be silently ignored.
_RAY_ONLY = {
    "ray_address": "--ray-address",
    "cpus_per_job": "--cpus-per-job",
    "gpus_per_job": "--gpus-per-job",
}


def check_backend(name: str) -> str:
    """``name`` if it is an attention backend the model knows (registered ones too), else a ValueError.

    Checked here rather than by argparse: the names live in the sparsebert package, whose import (torch,
    transformers) ``--help`` should not wait for."""
    from sparsebert import choices

    return choices.check("--attention-backend", name, choices.ATTENTION_BACKENDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.use_ray and (
        given := [flag for a, flag in _RAY_ONLY.items() if getattr(args, a) is not None]
    ):
        build_parser().error(f"{', '.join(given)} only apply to Ray: not allowed with --no-ray")
    try:
        tasks = parse_tasks(args.tasks)
        check_backend(args.attention_backend)
    except ValueError as e:
        build_parser().error(str(e))
    needs_glue = any(TASKS[t].kind == "glue" for t in tasks)
    needs_squad = any(TASKS[t].kind == "squad" for t in tasks)
    if not args.hub and ((needs_glue and not args.glue_dir) or (needs_squad and not args.squad_dir)):
        build_parser().error("give --glue-dir / --squad-dir for the tasks you named, or --hub")
    for ckpt in args.checkpoint:
        if not Path(ckpt).exists() and (ckpt.startswith((".", "/", "~")) or ckpt.count("/") > 1):
            build_parser().error(f"checkpoint {ckpt} not found")  # (an id like org/name means the hub)
    labels = args.labels.split(",") if args.labels else None
    source = DataSource(args.glue_dir, args.squad_dir, args.hub)
    try:
        check_inputs(args.checkpoint, tasks, source)  # before Ray starts and jobs fan out
    except (OSError, ValueError) as err:
        return console.usage_error(err, "python -m eval.run")
    from eval.runner import run_evaluation  # after the checks: --help and bad arguments answer at once

    console.quiet_libraries(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        squad_max_seq_len=args.squad_max_seq_len,
        doc_stride=args.doc_stride,
        max_steps=args.max_steps,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        attention_pattern=args.attention_pattern,
        attention_backend=args.attention_backend,
        bf16=args.bf16,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    outcome = run_evaluation(
        args.checkpoint,
        tasks,
        args.lrs,
        args.seeds,
        config,
        source,
        experiment=args.experiment,
        ray_address=args.ray_address,
        max_retries=args.max_retries,
        resume=args.resume,
        output_dir=args.output,
        labels=labels,
        cpus_per_job=1 if args.cpus_per_job is None else args.cpus_per_job,
        gpus_per_job=args.gpus_per_job,
        use_ray=args.use_ray,
    )
    print(outcome.markdown)
    print(
        f"{outcome.ran} jobs run, {outcome.skipped} already recorded; table in {outcome.output_dir}/results.md"
    )
    for f in outcome.failures:
        print(
            f"FAILED after {f.attempts} attempts: {f.job.checkpoint} {f.job.key}: {f.error}", file=sys.stderr
        )
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
