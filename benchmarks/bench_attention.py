"""One attention layer, every mask and backend, next to transformers' ``BertSelfAttention`` with SDPA.

    python benchmarks/bench_attention.py                                   # CPU: BERT-mini's layer
    python benchmarks/bench_attention.py --device cuda --size base --dtype bfloat16 --tokens 32768
    python benchmarks/bench_attention.py --lengths 2048 4096 --backends auto sdpa block_sparse flex  # auto's picks

For each sequence length the same layer (same weights) runs as transformers' ``BertSelfAttention`` with
``attn_implementation="sdpa"`` and no mask (the reference: what a user would otherwise pick), and as ours
with each pattern × backend. Every length keeps the tokens per call constant (batch = tokens / length).
Timed: forward + backward (training; FlexAttention has none on CPU) and forward without grad (inference).
Attention dropout is off so that every backend computes the same function (flex has no dropout).

Columns: ``density`` = allowed fraction of the L×L map; ``work`` = fraction of dense attention's scores the
backend computes (flex: the block tiles holding any allowed position; block_sparse: its plan's gathered
blocks, see sparsebert/model/block_sparse.py; eager and sdpa compute all of them); ``× ref`` = reference time /
our time (> 1 is faster; the median over pairs of calls made a moment apart, see common.py);
``% ideal`` = (× ref) / (1 / density); ``mem`` = CUDA peak memory of forward + backward, or on CPU the
tensors autograd saves for backward (MiB).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# common.py, and this checkout's sparsebert rather than whichever copy is installed:
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    allow_recompiles,
    bert_kwargs,
    load_average,
    markdown_table,
    median,
    peak_memory,
    time_paired,
    write_report,
)
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertSelfAttention

from sparsebert import SparseBertConfig
from sparsebert.model.attention import block_plan, choose_backend
from sparsebert.model.dam import DamMask
from sparsebert.model.flex_backend import block_density, flex_block_size
from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.mask_source import PatternMask
from sparsebert.model.masks import parse_spec

PATTERNS = ["dense", "no_diagonal", "longformer", "bigbird", "fixed", "star", "dam_s"]
BACKENDS = ["eager", "sdpa", "flex", "block_sparse"]


def frozen_dam_s(heads: int, max_len: int, seed: int = 0) -> DamMask:
    """A frozen DAM_s mask shaped like the paper's (≈ 9% dense at L=128): per head, a band of distances ≤ 1–3
    plus two far distances below 64 (what a search at seq 128 keeps); nothing beyond."""
    spec = parse_spec({"name": "dam_s", "max_len": max_len})
    mask = DamMask(spec, heads, 1, max_len)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mask.alpha.fill_(-1.0)
        for h in range(heads):
            band = int(torch.randint(2, 5, (1,), generator=g))
            mask.alpha[0, h, :band] = 1.0
            mask.alpha[0, h, torch.randint(8, 64, (2,), generator=g)] = 1.0
    mask.freeze()
    return mask


def mask_source(name: str, heads: int, max_len: int) -> torch.nn.Module:
    return frozen_dam_s(heads, max_len) if name == "dam_s" else PatternMask(parse_spec(name), heads)


def searching_dam_s(heads: int, max_len: int) -> DamMask:
    return DamMask(parse_spec({"name": "dam_s", "max_len": max_len}), heads, 1, max_len).train()


def saved_for_backward_mib(fn: Callable[[], torch.Tensor]) -> float:
    """MiB of distinct tensors autograd saves for backward during ``fn()`` (CPU's stand-in for peak memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20


def run_length(args, seq_len: int, device: torch.device, dtype: torch.dtype) -> list[list[object]]:
    batch = max(1, args.tokens // seq_len)
    kwargs = {**bert_kwargs(args.size, seq_len), "attention_probs_dropout_prob": 0.0}
    ref_cfg = BertConfig(**kwargs, attn_implementation="sdpa")
    ours_cfg = SparseBertConfig(**kwargs)
    torch.manual_seed(0)
    ref = BertSelfAttention(ref_cfg, layer_idx=0).to(device, dtype)
    ours = BertSelfAttention(ours_cfg, layer_idx=0).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    heads = ours_cfg.num_attention_heads
    x = torch.randn(batch, seq_len, ours_cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def train_step(module, **kw) -> Callable[[], torch.Tensor]:
        def step():
            x.grad = None
            module.zero_grad(set_to_none=True)
            out = module(x, attention_mask=None, **kw)[0]
            out.backward(grad)
            return out

        return step

    def infer(module, **kw) -> Callable[[], torch.Tensor]:
        def step():
            with torch.no_grad():
                return module(x, attention_mask=None, **kw)[0]

        return step

    def ours_with(source, backend: str, step_kind) -> Callable[[], torch.Tensor]:
        def masks() -> LayerMasks:
            return source.masks(seq_len, device)  # per call, as the model does once per forward pass

        def step():
            ours.config.attention_backend = backend
            return step_kind(ours, sparse_masks=masks())()

        return step

    train_cands: dict[str, Callable] = {"ref": train_step(ref)}
    infer_cands: dict[str, Callable] = {"ref": infer(ref)}
    info: dict[str, tuple[float, dict[str, float]]] = {}
    auto_label: dict[str, str] = {}
    for name in args.patterns:
        source = mask_source(name, heads, max(seq_len, 128)).to(device)
        masks = source.masks(seq_len, device)
        work = {"eager": 1.0, "sdpa": 1.0, "block_sparse": block_plan(masks, 0).work}
        work["flex"] = block_density(masks, 0, flex_block_size(device))
        # auto: what it resolves to for this mask (training, inference), labelled and costed as that backend.
        picks = [
            choose_backend("auto", masks, device, needs_grad=grad, dropout=0.0) for grad in (True, False)
        ]
        work["auto"] = work[picks[0]]
        auto_label[name] = f"auto→{picks[0]}" if picks[0] == picks[1] else f"auto→{picks[0]}/{picks[1]}"
        info[name] = (float(masks.hard.float().mean()), work)
        for backend in args.backends:
            if backend != "flex" or device.type == "cuda":  # no FlexAttention backward on CPU
                train_cands[f"{name}/{backend}"] = ours_with(source, backend, train_step)
            if "infer" in args.modes:
                infer_cands[f"{name}/{backend}"] = ours_with(source, backend, infer)
    if args.search:
        search = searching_dam_s(heads, max(seq_len, 128)).to(device)
        for backend in [b for b in args.backends if b in ("eager", "sdpa")]:  # the others need a fixed mask
            train_cands[f"dam_s search/{backend}"] = ours_with(search, backend, train_step)

    ours.train()
    train, train_ratio = time_paired(train_cands, "ref", device, args.repeats, args.warmup)
    ours.eval()
    ref.eval()
    infer_t, infer_ratio = {}, {}
    if len(infer_cands) > 1:
        infer_t, infer_ratio = time_paired(infer_cands, "ref", device, args.repeats, args.warmup)
    ours.train()
    ref.train()

    def mem(name: str) -> float | None:
        fn = train_cands[name]
        if device.type == "cuda":
            return peak_memory(fn, device)
        return saved_for_backward_mib(fn)

    t_ref = median(train["ref"])
    i_ref = median(infer_t["ref"]) * 1e3 if infer_t else None
    rows = [[seq_len, batch, "reference (HF sdpa)", "dense", 1.0, 1.0, t_ref * 1e3, 1.0, None,
             i_ref, 1.0 if infer_t else None, None, mem("ref")]]  # fmt: skip
    for cand in [c for c in {**infer_cands, **train_cands} if c != "ref"]:
        pattern, backend = cand.split("/")
        searching = pattern.endswith("search")
        density, work = (None, None) if searching else (info[pattern][0], info[pattern][1][backend])
        ideal = None if density is None else 1.0 / density
        t = median(train[cand]) if cand in train else None
        i = median(infer_t[cand]) if cand in infer_t else None
        speed_t = median(train_ratio[cand]) if cand in train else None
        speed_i = median(infer_ratio[cand]) if cand in infer_t else None
        label = auto_label.get(pattern, backend) if backend == "auto" else backend
        rows.append([
            seq_len, batch, pattern, label, density, work,
            None if t is None else t * 1e3, speed_t, _pct(speed_t, ideal),
            None if i is None else i * 1e3, speed_i, _pct(speed_i, ideal),
            mem(cand) if cand in train else None,
        ])  # fmt: skip
    return rows


def _pct(speed: float | None, ideal: float | None) -> str | None:
    return None if speed is None or ideal is None else f"{100 * speed / ideal:.0f}%"


HEADER = ["L", "batch", "mask", "backend", "density", "work", "fwd+bwd ms", "× ref", "% ideal",
          "fwd ms", "× ref", "% ideal", "mem MiB"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="mini", help="BERT size whose attention layer is timed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch = tokens / L)")
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--backends", nargs="+", default=BACKENDS)
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the DAM search rows")
    parser.add_argument(
        "--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"],
        help="infer adds forward-only (no grad) timings of every row; train (fwd+bwd) always runs",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    allow_recompiles()
    start_load = load_average()
    title = f"Attention layer: SparseBERT vs transformers' BERT ({device.type})"
    intro = (
        f"One attention layer of BERT-{args.size} ({args.dtype}), {args.tokens} tokens per call, median of "
        f"{args.repeats} interleaved repeats. Reference: transformers' `BertSelfAttention`, SDPA, no mask. "
        f"Flex block size {flex_block_size(device)}.\n\n"
    )
    rows: list[list[object]] = []
    for i, seq_len in enumerate(args.lengths):
        rows += run_length(args, seq_len, device, dtype)
        print(markdown_table(HEADER, [r for r in rows if r[0] == seq_len]), flush=True)
        complete = i == len(args.lengths) - 1
        write_report(args.out, title, device, intro + markdown_table(HEADER, rows), start_load, complete)


if __name__ == "__main__":
    main()
