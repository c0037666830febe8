"""Block-structured DAM on CPU: training-step speed of a frozen ``dam_b`` mask against dense attention and a
token-level ``dam_s`` mask of the same sparsity, and held-out MLM loss after equal steps.

    python benchmarks/bench_dam_block.py                 # full size, L = 1024 and 2048: writes results/dam_block_cpu.md
    python benchmarks/bench_dam_block.py --smoke         # L = 256, a few steps: proves it runs; writes nothing

Per length, on the demo corpus (``full_sentences`` packing at that length), a BERT-tiny per candidate trains
``--steps`` steps from the same initial weights: dense; ``dam_s`` and ``dam_b`` (``--block``, per-head layouts,
and one layout shared by the heads) searching for ``--search`` steps aimed at ``--target`` sparsity
(``dam.target_sparsity``'s controller), frozen at it, trained on. Then the frozen models' training steps
(forward + backward + AdamW, one fixed batch) are timed in turn, each right after a dense step, and the speed is
the median of the paired ratios (``common.time_paired``): ``× dense`` > 1 is faster. The backend is what
``auto`` picks for a training pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, markdown_table, median, time_paired
from steering import RESULTS, demo_corpus, header, heldout_loss, model_for, pretrain, reader

from sparsebert.data import model_inputs

TINY = (2, 128, 2)


def candidates(block: int) -> dict[str, object]:
    return {
        "dense": "dense",
        "dam_s": {"name": "dam_s"},
        f"dam_b (block {block}, per head)": {"name": "dam_b", "block": block},
        f"dam_b (block {block}, shared)": {"name": "dam_b", "block": block, "share_heads": True},
    }


def one_length(args, seq_len: int) -> list[list[object]]:
    """Train every candidate at ``seq_len``, then time their frozen training steps against dense."""
    corpus = demo_corpus(args.cache, "full_sentences", seq_len)
    models, rows = {}, {}
    for name, pattern in candidates(args.block).items():
        torch.manual_seed(0)
        model = model_for(corpus, TINY, pattern, seq_len)
        search = 0 if pattern == "dense" else args.search
        pretrain(model, iter(reader(corpus, args.batch)), args.steps, search, args.target if search else None)
        sparsity = 1 - model.current_mask(seq_len).float().mean().item()
        backend = model.attention_in_force(seq_len, training=True)[0]
        rows[name] = [seq_len, name, sparsity, backend, heldout_loss(model, corpus, args.batch)]
        models[name] = model
        print(f"trained {name} at L={seq_len}: sparsity {sparsity:.3f}, backend {backend}", flush=True)
    batch = model_inputs(next(iter(reader(corpus, args.batch))), nsp=False)
    steps = {name: _step(model, batch) for name, model in models.items()}
    samples, ratios = time_paired(steps, "dense", torch.device("cpu"), args.repeats, warmup=1)
    for name, row in rows.items():
        row += [median(samples[name]), median(ratios[name]) if name in ratios else 1.0]
    return list(rows.values())


def _step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


HEADER = ["L", "mask", "sparsity", "backend (auto)", "held-out MLM loss", "s / step", "× dense"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--search", type=int, default=150)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparsebert" / "bench")
    parser.add_argument("--smoke", action="store_true", help="L = 256, a few steps; writes no results file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.block, args.steps, args.search, args.repeats = [256], 32, 4, 2, 1
    start = header(torch.device("cpu"))
    rows = [row for seq_len in args.lengths for row in one_length(args, seq_len)]
    body = markdown_table(HEADER, rows)
    print(body)
    if not args.smoke:
        settings = f"BERT-tiny, batch {args.batch}, {args.steps} steps ({args.search} searching), target {args.target}"
        text = (
            f"# Block-structured DAM (CPU)\n\n{start}\nLoad: {load_average()} (end)\n\n{settings}\n\n{body}\n"
        )
        (RESULTS / "dam_block_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
