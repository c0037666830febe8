"""Model FLOPs and MFU, one formula for the benchmarks and the trainer.

FLOPs of a training step = 6·N·T + 12·layers·hidden·L·T: N = all parameters (the tied word embedding counted once,
as the MLM decoder's matmul; DAM's mask logits left out), T = tokens (padding included: it is computed), the second
term dense attention's QKᵀ and PV, forward and backward. When the MLM head runs on the masked tokens only
(``mlm_logits="masked_only"``), 6·(T − T_masked)·N_head is not spent. Sparse masks are credited with the dense
model's FLOPs, so MFU compares times.
"""

from __future__ import annotations

import torch

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}  # dense bf16 tensor-core peaks


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """One device's peak FLOP/s: ``override_tflops`` if given, else the known GPU's dense bf16 peak, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def model_flops(
    model: torch.nn.Module, tokens: float, seq_len: int, masked_tokens: float | None = None
) -> float:
    """FLOPs of training ``model`` (a SparseBERT MLM model) on ``tokens`` tokens of length-``seq_len`` sequences;
    ``masked_tokens``: the MLM head ran on those only (None: on every token)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "sparse_mask" not in name)
    flops = 6 * n * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len * tokens
    if masked_tokens is not None:
        head = sum(p.numel() for p in model.cls.predictions.transform.parameters())
        head += cfg.vocab_size * cfg.hidden_size + cfg.vocab_size
        flops -= 6 * (tokens - masked_tokens) * head
    return flops
