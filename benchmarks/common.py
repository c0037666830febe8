"""Shared by the benchmarks: interleaved timing, peak memory, the machine's description, markdown tables.

The machines these run on are shared, so a benchmark never times one candidate's repeats back to back:
every repeat runs each candidate once, in turn, each right after a call of the reference, and a ratio to
the reference is the median of those pairs' ratios. A burst of load then slows both calls of a pair alike,
and ratios stay meaningful even when absolute times move.
"""

from __future__ import annotations

import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# BERT's official sizes (layers, hidden, heads), as in sparsebert.train.config.
SIZES = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "base": (12, 768, 12)}
VOCAB = 30522  # BERT's WordPiece vocabulary: the MLM head's real cost


def bert_kwargs(size: str, max_len: int) -> dict:
    """``BertConfig`` keyword arguments for one of BERT's sizes (dropouts as BERT's: 0.1)."""
    layers, hidden, heads = SIZES[size]
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, max_len),
    )


def allow_recompiles(limit: int = 64) -> None:
    """Lift dynamo's recompile limit (8): every (batch, length) is a new compiled FlexAttention graph, and past
    the limit dynamo silently runs FlexAttention uncompiled (slow, and not what a benchmark means to time)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):  # fmt: skip
        if hasattr(config, name):  # renamed across torch versions
            setattr(config, name, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paired(
    candidates: dict[str, Callable[[], object]],
    reference: str,
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every candidate right after a call of ``reference``, ``repeats`` times, in turn.

    Returns (seconds per call of every candidate, reference time / candidate time of each pair). A ratio
    taken from two calls a moment apart survives load that comes and goes; report its median.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    ratios: dict[str, list[float]] = {name: [] for name in candidates if name != reference}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if name == reference:
                continue
            t_ref, t = _seconds(candidates[reference], device), _seconds(fn, device)
            samples[reference].append(t_ref)
            samples[name].append(t)
            ratios[name].append(t_ref / t)
    return samples, ratios


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) allocated by one call on CUDA; None elsewhere (CPU has no allocator stats)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers came from."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        hw = f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    import transformers

    return f"{hw}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_report(
    path: str | None, title: str, device: torch.device, body: str, load_before: str, complete: bool = True
) -> None:
    """Write the report as markdown (machine and command included) when ``path`` is given; print it when complete.

    Benchmarks write after every chunk with ``complete=False`` too, so a run cut short (a timeout) leaves its
    rows behind, marked incomplete.
    """
    status = "" if complete else "**Incomplete run**: only the rows measured so far.\n\n"
    text = (
        f"# {title}\n\n"
        f"Machine: {machine(device)}  \n"
        f"Command: `{command_line()}`  \n"
        f"Load: {load_before} (start), {load_average()} (end); date {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"{status}{body}\n"
    )
    if complete:
        print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
