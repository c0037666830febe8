"""Does ``dam.target_sparsity`` land where it is aimed? Final frozen sparsity and held-out MLM loss per target.

    python benchmarks/bench_sparsity_target.py                 # full size: writes results/sparsity_target_cpu.md
    python benchmarks/bench_sparsity_target.py --smoke         # a few steps, proves the script runs; writes nothing

On the demo corpus (Python's documentation, 64-token samples, ``full_sentences`` packing), a BERT-tiny searches a
DAM mask for ``--search`` steps with the sparsity target's controller (λ a Lagrange multiplier, the defaults of
``dam.lambda_lr``, ``dam.lambda_gain``, ``dam.target_warmup``), freezes it at the target and trains on to
``--steps``. Per target: the expected sparsity 1 − mean σ(α) when the search ends, the sparsity of 1[α > 0]
before the freeze's shift, the frozen sparsity (the target is met within ±2 points when |Δ| ≤ 0.02), λ at the
end of the search, and the held-out MLM loss after all steps. The fixed-λ row (no target) is the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, markdown_table
from steering import RESULTS, demo_corpus, header, heldout_loss, model_for, pretrain, reader

TINY = (2, 128, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", default=["dam_s", "dam_u"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.8, 0.95])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--search", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparsebert" / "bench")
    parser.add_argument("--smoke", action="store_true", help="a few steps; writes no results file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.search, args.targets, args.patterns = 6, 4, [0.8], ["dam_s"]
    start = header(torch.device("cpu"))
    corpus = demo_corpus(args.cache, "full_sentences", 64)
    rows = []
    for pattern in args.patterns:
        for target in [None, *args.targets]:
            torch.manual_seed(0)
            model = model_for(corpus, TINY, {"name": pattern, "lambda": 1e-4}, 64)
            run = pretrain(model, iter(reader(corpus, args.batch)), args.steps, args.search, target)
            frozen = 1 - model.current_mask(64).float().mean().item()
            delta = None if target is None else frozen - target
            lam = run.lambdas[-1] if run.lambdas else 1e-4
            loss = heldout_loss(model, corpus, args.batch)
            rows.append(
                [pattern, target, run.expected_sparsity, run.threshold_sparsity, frozen, delta, lam, loss]
            )
            print(markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    body = markdown_table(HEADER, rows)
    print(body)
    if not args.smoke:
        text = f"# DAM sparsity target (CPU)\n\n{start}\nLoad: {load_average()} (end)\n\n{body}\n"
        (RESULTS / "sparsity_target_cpu.md").write_text(text)


HEADER = [
    "pattern",
    "target",
    "E[sparsity] end of search",
    "1[α>0] before shift",
    "frozen sparsity",
    "Δ",
    "λ at end",
    "held-out MLM loss",
]

if __name__ == "__main__":
    main()
