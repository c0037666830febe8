"""Before timing anything on a GPU: the fast paths must compute what eager computes, backward included.

    python benchmarks/gpu_sanity.py [--device cuda]

FlexAttention's backward exists on GPU only, so this is where it is checked: for fixed masks (one shared by
every head, and per-head DAM_s masks) on a padded batch whose length is no multiple of the block size,
compiled flex and sdpa must match eager in the loss, the logits and every gradient (float32), and bf16 must
stay finite and close. ``auto`` must pick flex for a fixed sparse mask in GPU inference, and never for training with attention
dropout. Exits non-zero on any
mismatch. On CPU (a dry run of this script) flex is checked forward only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sparsebert, installed or not
from sparsebert import SparseBertConfig, SparseBertForMaskedLM
from sparsebert.model.attention import choose_backend

SMALL = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=512,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
PATTERNS = [{"name": "longformer", "window": 3}, "star", "bigbird", {"name": "dam_s", "frozen": True}]


def run(pattern, backend: str, device: torch.device, dtype: torch.dtype, train: bool):
    torch.manual_seed(0)
    model = SparseBertForMaskedLM(
        SparseBertConfig(**SMALL, attention_pattern=pattern, attention_backend=backend)
    )
    if isinstance(pattern, dict) and pattern["name"] == "dam_s":
        with torch.no_grad():
            model.bert.sparse_mask.alpha.normal_(generator=torch.Generator().manual_seed(1))  # per-head masks
    model.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, SMALL["vocab_size"], (3, 300), generator=g).to(device)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 211:] = 0
    attention_mask[2, 40:] = 0
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast, torch.set_grad_enabled(train):
        out = model(ids, attention_mask=attention_mask, labels=ids)
    grads = {}
    if train:
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().float(), out.logits.detach().float(), grads


def _differs(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why ``got`` is not ``expected`` (None when it is): elementwise in float32, relative norm in bf16."""
    if not torch.isfinite(got).all():
        return "is not finite"
    if dtype == torch.float32:
        if not torch.allclose(got, expected, atol=1e-4, rtol=1e-3):
            return f"differs by up to {(got - expected).abs().max().item():.3g}"
        return None
    error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    return f"has relative error {error:.3g}" if error > 5e-2 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    failures = []
    for pattern in PATTERNS:
        for dtype in (torch.float32, torch.bfloat16):
            ref = run(pattern, "eager", device, dtype, True)
            for backend in ("sdpa", "flex", "block_sparse"):
                train = backend != "flex" or device.type == "cuda"  # no flex backward on CPU
                got = run(pattern, backend, device, dtype, train)
                label = f"{pattern} {backend} {dtype}"
                checks = [("loss", got[0], ref[0]), ("logits", got[1], ref[1])]
                # A key bias adds the same score to every key of a query, which softmax cancels: its gradient
                # is zero up to rounding, and a relative error of rounding noise means nothing.
                checks += [
                    (f"grad {n}", g, ref[2][n]) for n, g in got[2].items() if not n.endswith("key.bias")
                ]
                failures += [
                    f"{label}: {what} {why}" for what, a, b in checks if (why := _differs(a, b, dtype))
                ]
                print(f"checked {label}: {len(checks)} tensors", flush=True)
    model = SparseBertForMaskedLM(SparseBertConfig(**SMALL, attention_pattern="longformer")).to(device)
    masks = model.bert.masks_for(torch.zeros(1, 256, dtype=torch.long, device=device))
    picked = choose_backend("auto", masks, device, needs_grad=False, dropout=0.0)
    if device.type == "cuda" and picked != "flex":
        failures.append(f"auto picked {picked} for a fixed sparse mask in GPU inference, expected flex")
    picked = choose_backend("auto", masks, device, needs_grad=True, dropout=0.1)
    if picked == "flex":
        failures.append("auto picked flex for training with attention dropout: flex would drop it")
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    print("gpu_sanity:", "FAILED" if failures else "all fast paths match eager")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
