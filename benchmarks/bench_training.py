"""Tokens/s of a full pre-training step: ``SparseBertForPreTraining`` vs ``transformers.BertForPreTraining``.

    python benchmarks/bench_training.py                                     # CPU: BERT-tiny and -mini
    python benchmarks/bench_training.py --device cuda --sizes base --tokens 16384 --bf16 --compile

A step is forward (MLM on 15% of the tokens + NSP) + backward + AdamW step, in training mode (dropout 0.1),
on full-length sequences. The reference is transformers' ``BertForPreTraining`` with the same config and
weights and ``attn_implementation="sdpa"``. Every candidate runs in turn within each repeat, right after a
reference step (see ``common.py``): tokens/s come from the median step time, ``× ref`` from the median of
the paired ratios. Rows: the reference, our model with several masks (``auto`` backend unless named), the
DAM_s search step next to the frozen DAM_s step, and the opt-in ``mlm_logits="masked_only"``.

On CUDA, MFU = model FLOPs / time / peak, FLOPs by ``sparsebert.train.flops`` (the formula the trainer reports MFU
with): 6·N·T + 12·layers·hidden·L·T, less the MLM head's share on unmasked tokens with masked-only logits.
Sparse rows are credited with the dense model's FLOPs (so MFU compares times).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

# common.py, and this checkout's sparsebert rather than whichever copy is installed:
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (
    VOCAB,
    allow_recompiles,
    bert_kwargs,
    load_average,
    markdown_table,
    median,
    time_paired,
    write_report,
)
from transformers import BertConfig, BertForPreTraining

from sparsebert import SparseBertConfig, SparseBertForPreTraining
from sparsebert.train import flops

# (row name, attention_pattern, attention_backend, mlm_logits, DAM searching)
CANDIDATES = [
    ("dense", "dense", "auto", "all", False),
    ("longformer", "longformer", "auto", "all", False),
    ("bigbird", "bigbird", "auto", "all", False),
    ("star", "star", "auto", "all", False),
    ("dam_s frozen", "dam_s", "auto", "all", False),
    ("dam_s search", "dam_s", "auto", "all", True),
    ("dam_s search, eager", "dam_s", "eager", "all", True),
    ("dense, masked_only", "dense", "auto", "masked_only", False),
    ("longformer, masked_only", "longformer", "auto", "masked_only", False),
    ("dam_s frozen, masked_only", "dam_s", "auto", "masked_only", False),
    ("dam_s search, masked_only", "dam_s", "auto", "masked_only", True),
]


def batch_for(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=g)
    labels = torch.where(torch.rand(batch, seq_len, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": (torch.arange(seq_len) >= seq_len // 2)
        .long()
        .expand(batch, -1)
        .contiguous()
        .to(device),
        "labels": labels.to(device),
        "next_sentence_label": torch.randint(0, 2, (batch,), generator=g).to(device),
    }


def model_flops(model: torch.nn.Module, cfg, batch: dict, masked_only: bool) -> float:
    """FLOPs of one step (sparsebert.train.flops' formula, shared with the trainer)."""
    masked = int((batch["labels"] != -100).sum()) if masked_only else None
    return flops.model_flops(model, batch["input_ids"].numel(), batch["input_ids"].shape[1], masked)


def make_step(model, optimizer, batch: dict, autocast) -> Callable[[], None]:
    def step():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def freeze_like_search(model: SparseBertForPreTraining) -> None:
    """A frozen DAM_s mask as a search at seq 128 would leave it (≈ 9% dense): see bench_attention."""
    from bench_attention import frozen_dam_s

    source = model.bert.sparse_mask
    source.alpha.data.copy_(frozen_dam_s(source.alpha.shape[1], source.max_len).alpha)
    model.freeze_mask()


def run(args, size: str, seq_len: int, device: torch.device) -> tuple[list[list[object]], list[list[object]]]:
    batch_size = max(1, args.tokens // seq_len)
    kwargs = bert_kwargs(size, seq_len)
    batch = batch_for(kwargs["vocab_size"], batch_size, seq_len, device)
    fused = {"fused": True} if device.type == "cuda" else {}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext

    torch.manual_seed(0)
    ref = BertForPreTraining(BertConfig(**kwargs, attn_implementation="sdpa")).to(device).train()
    models: dict[str, tuple[torch.nn.Module, bool]] = {"reference (HF sdpa)": (ref, False)}
    for name, pattern, backend, mlm_logits, searching in CANDIDATES:
        if name not in args.rows:
            continue
        cfg = SparseBertConfig(
            **kwargs, attention_pattern=pattern, attention_backend=backend, mlm_logits=mlm_logits
        )
        model = SparseBertForPreTraining(cfg)
        model.load_state_dict(ref.state_dict(), strict=False)  # same weights (α stays as initialised)
        if pattern == "dam_s" and not searching:
            freeze_like_search(model)
        models[name] = (model.to(device).train(), mlm_logits == "masked_only")
    if args.compile and (not args.compile_lengths or seq_len in args.compile_lengths):
        for name in [n for n in models if n in ("reference (HF sdpa)", "dense")]:
            model, masked_only = models[name]
            compiled = type(model)(model.config).to(device).train()
            compiled.load_state_dict(model.state_dict())
            models[f"{name}, compiled"] = (torch.compile(compiled), masked_only)

    steps = {}
    for name, (model, _) in models.items():
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **fused)
        steps[name] = make_step(model, optimizer, batch, autocast)
        if name.endswith("compiled"):
            for _ in range(3):  # compile, then the recompile once the mask cache is filled
                steps[name]()
    reference = "reference (HF sdpa)"
    times, speed = time_paired(steps, reference, device, args.repeats, args.warmup)
    speed[reference] = [1.0]

    tokens = batch_size * seq_len
    peak = flops.peak_flops(device, args.peak_tflops)
    ref_cfg = ref.config
    rows = []
    for name, (model, masked_only) in models.items():
        t = median(times[name])
        mfu = None
        if peak:
            base = getattr(model, "_orig_mod", model)
            mfu = f"{100 * model_flops(base, ref_cfg, batch, masked_only) / t / peak:.1f}%"
        rows.append([size, seq_len, batch_size, name, t * 1e3, tokens / t, median(speed[name]), mfu])
    ratios = []
    for suffix in ("", ", masked_only"):  # the search step's cost, with and without the MLM head's bulk
        search, frozen = speed.get(f"dam_s search{suffix}"), speed.get(f"dam_s frozen{suffix}")
        if search and frozen:  # (t_ref / t_frozen) / (t_ref / t_search), each from paired calls
            ratios.append([size, seq_len, suffix.lstrip(", ") or "all", median(frozen) / median(search)])
    return rows, ratios


HEADER = ["size", "L", "batch", "model", "step ms", "tokens/s", "× ref", "MFU"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mini"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch = tokens / L)")
    parser.add_argument("--rows", nargs="+", default=[c[0] for c in CANDIDATES], help="our rows to run")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd reference and dense rows")
    parser.add_argument("--compile-lengths", type=int, nargs="*", default=[], help="only these (default all)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU when the GPU is not known")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    allow_recompiles()
    start_load = load_average()
    title = f"Training step: SparseBERT vs transformers' BERT ({device.type})"
    precision = "bf16 autocast" if args.bf16 else "float32"
    intro = (
        f"Pre-training step (MLM 15% + NSP, AdamW, dropout 0.1, {precision}), {args.tokens} tokens per step, "
        f"median of {args.repeats} interleaved repeats; BERT's vocabulary ({VOCAB}). "
        "Reference: transformers' `BertForPreTraining`, SDPA. `× ref` = reference step time / ours.\n\n"
    )
    runs = [(size, seq_len) for size in args.sizes for seq_len in args.lengths]
    rows: list[list[object]] = []
    ratios: list[list[object]] = []
    for i, (size, seq_len) in enumerate(runs):
        new, new_ratios = run(args, size, seq_len, device)
        print(markdown_table(HEADER, new), flush=True)
        rows += new
        ratios += new_ratios
        body = intro + markdown_table(HEADER, rows)
        if ratios:
            body += "\n\nDAM_s search step time / frozen DAM_s (fixed mask) step time:\n\n"
            body += markdown_table(["size", "L", "mlm_logits", "search / fixed"], ratios)
        write_report(args.out, title, device, body, start_load, complete=i == len(runs) - 1)


if __name__ == "__main__":
    main()
