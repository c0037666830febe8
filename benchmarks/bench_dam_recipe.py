"""The α recipes side by side, over seeds: how far α moves, the sparsity it ends at, and the diagonal's importance
rank with its uncertainty — is the search's ranking of distances signal or noise?

    python benchmarks/bench_dam_recipe.py             # full size, 3 seeds: writes results/dam_recipe_cpu.md (+ .png)
    python benchmarks/bench_dam_recipe.py --smoke     # a few steps, one seed: proves it runs; writes nothing

The demo recipe (BERT-tiny, 64 tokens, ``full_sentences`` demo corpus, AdamW) searches a ``dam_u`` mask
(λ = 1e-4) for ``--search`` of ``--steps`` steps under each α recipe: α's own Adam at ``train.dam_lr`` (the
default), α in the model's optimizer at its lr (``dam.alpha_optimizer=model``, the authors' code), α outside the
gradient clipping (``dam.clip_alpha=false``), and the search running to the end (``dam.freeze=false``, the
authors' released code). Per run: the mean abs(Δα) over the search, the mask's sparsity, and the diagonal's rank among
the 64 distances by mean importance σ(α) (1 = least important, the paper's finding) with its 95% bootstrap interval
over heads and positions. Per recipe: the rank's mean and spread over seeds. A figure shows each recipe's
importance by distance with ± the spread across seeds and across heads and positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, markdown_table
from steering import RESULTS, demo_corpus, header, model_for, pretrain, reader

from sparsebert.track.importance import distance_profile, rank_interval, save_runs_figure
from sparsebert.train.config import DamConfig

TINY = (2, 128, 2)
RECIPES = {  # name: (α's recipe, train keys, search to the end)
    "own Adam at dam_lr (default)": (DamConfig(), {}, False),
    "model's optimizer and lr (authors')": (DamConfig(alpha_optimizer="model"), {"dam_lr": None}, False),
    "α unclipped": (DamConfig(clip_alpha=False), {}, False),
    "search to the end (authors')": (DamConfig(freeze=False), {}, True),
}


def one_run(args, corpus: Path, recipe, seed: int):
    dam, train_keys, to_end = recipe
    torch.manual_seed(seed)
    model = model_for(corpus, TINY, {"name": "dam_u", "lambda": 1e-4}, 64)
    before = model.mask_source.alpha.detach().clone()
    search = args.steps if to_end else args.search
    pretrain(model, iter(reader(corpus, args.batch, seed=seed)), args.steps, search, dam=dam, **train_keys)
    moved = (model.mask_source.alpha.detach() - before)[..., :64, :64].abs().mean().item()
    importance = model.mask_importance(64)
    rank, low, high = rank_interval(importance, distance=0, draws=args.draws, seed=seed)
    sparsity = 1 - model.current_mask(64).float().mean().item()
    return [moved, sparsity, rank, f"{low:.0f}–{high:.0f}"], distance_profile(importance)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--search", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparsebert" / "bench")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed; writes no results file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.search, args.draws = [0], 4, 2, 20
    start = header(torch.device("cpu"))
    corpus = demo_corpus(args.cache, "full_sentences", 64)
    rows, summary, profiles = [], [], {}
    for name, recipe in RECIPES.items():
        ranks = []
        for seed in args.seeds:
            row, profile = one_run(args, corpus, recipe, seed)
            rows.append([name, seed, *row])
            print(markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
            ranks.append(row[2])
            profiles.setdefault(name, []).append(profile)
        spread = statistics.stdev(ranks) if len(ranks) > 1 else 0.0
        summary.append([name, len(ranks), statistics.mean(ranks), spread])
    body = markdown_table(HEADER, rows) + "\n\n" + markdown_table(SUMMARY, summary)
    print(body)
    if not args.smoke:
        figure = save_runs_figure(profiles, RESULTS / "dam_recipe_cpu.png", "DAM_u importance by α recipe")
        settings = f"BERT-tiny, L = 64, batch {args.batch}, {args.search} of {args.steps} steps searching"
        text = (
            f"# The α recipes (CPU)\n\n{start}\nLoad: {load_average()} (end)\n\n{settings}\n\n{body}\n\n"
            f"![importance by distance]({figure.name})\n"
        )
        (RESULTS / "dam_recipe_cpu.md").write_text(text)


HEADER = ["recipe", "seed", "mean abs(Δα)", "sparsity", "diagonal's rank (1 = least)", "95% interval"]
SUMMARY = ["recipe", "seeds", "diagonal's mean rank", "± std over seeds"]

if __name__ == "__main__":
    main()
