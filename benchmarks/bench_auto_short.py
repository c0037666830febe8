"""Which backend ``auto`` should pick for a fixed sparse mask in GPU inference at L ≤ 128: measured, then decided.

    python benchmarks/bench_auto_short.py --device cuda --out benchmarks/results/gpu_auto_short_<gpu>.md

On GPU, ``auto`` sends a fixed sparse mask without attention dropout (inference) to ``flex``. The GPU flex block
is 128, so at L ≤ 128 the whole map is one block: FlexAttention skips nothing there and may well be slower than
what ``auto`` picks otherwise (``block_sparse`` where its plan leaves at most BLOCK_SPARSE_MAX_WORK of the work,
else ``sdpa``: "the rule without flex" below). This times one attention layer's forward (no grad) per mask and
length with flex, sdpa and block_sparse, interleaved (common.time_paired, sdpa the reference), and writes the
decision under the table: keep flex, unless the rule without flex is at least ``--margin`` faster over the
geometric mean of every mask and length. benchmarks/gpu_check.sh runs it; sparsebert/model/attention.py's
``choose_backend`` is where the rule would change.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import mask_source
from common import (
    allow_recompiles,
    bert_kwargs,
    load_average,
    markdown_table,
    median,
    time_paired,
    write_report,
)
from transformers.models.bert.modeling_bert import BertSelfAttention

from sparsebert import SparseBertConfig
from sparsebert.model.attention import block_plan, choose_backend

PATTERNS = ["longformer", "bigbird", "star", "dam_s"]
BACKENDS = ["flex", "sdpa", "block_sparse"]
HEADER = ["L", "batch", "mask", "density", "block_sparse work", "auto picks", "without flex",
          "flex ms", "sdpa ms", "block_sparse ms", "flex ÷ without flex (speed)"]  # fmt: skip


def run_length(args, seq_len: int, device: torch.device, dtype: torch.dtype) -> list[list[object]]:
    batch = max(1, args.tokens // seq_len)
    config = SparseBertConfig(**bert_kwargs(args.size, seq_len), attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    layer = BertSelfAttention(config, layer_idx=0).to(device, dtype).eval()
    x = torch.randn(batch, seq_len, config.hidden_size, device=device, dtype=dtype)
    rows = []
    for name in args.patterns:
        source = mask_source(name, config.num_attention_heads, max(seq_len, 128)).to(device)

        def forward(backend: str, source=source):
            def step():
                layer.config.attention_backend = backend
                with torch.no_grad():  # masks per call, as the model builds them once per forward pass
                    return layer(x, attention_mask=None, sparse_masks=source.masks(seq_len, device))[0]

            return step

        times, _ = time_paired({b: forward(b) for b in BACKENDS}, "sdpa", device, args.repeats, args.warmup)
        ms = {b: median(t) * 1e3 for b, t in times.items()}
        masks = source.masks(seq_len, device)
        picks = choose_backend("auto", masks, device, needs_grad=False, dropout=0.0)
        without_flex = choose_backend("auto", masks, device, needs_grad=False, dropout=0.1)  # flex excluded
        rows.append([
            seq_len, batch, name, float(masks.hard.float().mean()), block_plan(masks, 0).work, picks,
            without_flex, ms["flex"], ms["sdpa"], ms["block_sparse"], ms[without_flex] / ms["flex"],
        ])  # fmt: skip
    return rows


def decision(rows: list[list[object]], device: torch.device, margin: float) -> str:
    """One line: keep flex, or use the rule without flex, from the geometric mean of the speed ratios."""
    ratios = [row[-1] for row in rows]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    lengths = sorted({row[0] for row in rows})
    scope = f"L in {lengths}, {len(ratios)} mask × length rows"
    if device.type != "cuda":
        return f"No decision: measured on {device.type}; the rule is for GPU inference (flex ÷ without flex {geomean:.2f}×, {scope})."
    if geomean < 1 / (1 + margin):
        return (
            f"Decision: at L ≤ 128 in GPU inference, `auto` should use the rule without flex (block_sparse "
            f"where its plan's work ≤ BLOCK_SPARSE_MAX_WORK, else sdpa): flex runs at {geomean:.2f}× its speed "
            f"(geometric mean, {scope})."
        )
    return f"Decision: at L ≤ 128 in GPU inference, keep flex: it runs at {geomean:.2f}× the speed of the rule without flex (geometric mean, {scope})."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="base", help="BERT size whose attention layer is timed")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (batch = tokens / L)")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--margin", type=float, default=0.05, help="how much faster the rule without flex must be"
    )
    parser.add_argument("--out", default=None, help="markdown file for the table and the decision")
    args = parser.parse_args(argv)
    if max(args.lengths) > 128:
        parser.error("--lengths: this decides the rule at L ≤ 128 only")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    allow_recompiles()
    start_load = load_average()
    intro = (
        f"One attention layer of BERT-{args.size} ({args.dtype}), forward without grad, {args.tokens} tokens per "
        f"call, median of {args.repeats} interleaved repeats; the last column is the time of the backend `auto` "
        "uses without flex (block_sparse or sdpa) ÷ flex's time (> 1: flex is faster).\n\n"
    )
    rows: list[list[object]] = []
    for seq_len in args.lengths:
        rows += run_length(args, seq_len, device, dtype)
        print(markdown_table(HEADER, [r for r in rows if r[0] == seq_len]), flush=True)
    verdict = decision(rows, device, args.margin)
    title = f"`auto` at L ≤ 128: flex vs the rule without flex, inference ({device.type})"
    write_report(args.out, title, device, intro + markdown_table(HEADER, rows) + "\n\n" + verdict, start_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
