"""End-to-end pre-training throughput at long sequences: ``sparsebert/pretrain.py`` itself (data, model, DeepSpeed
engine, optimizer), dense against sparse masks, as ratios measured in one run.

    python benchmarks/bench_pretrain_long.py --size mini --lengths 512 2048 4096 \
        --out benchmarks/results/pretrain_long_cpu.md

For every length L it prepares a corpus of full-sentence samples of L tokens (data_prep, the Python documentation
text, no network) and writes one starting checkpoint (random weights, ``max_position_embeddings`` = the longest L,
plus a frozen ``dam_s`` band: α > 0 exactly for distances ≤ ``--window``). Each row then runs the real entry point,
one process, continuing from that checkpoint (so every row starts from the same weights):

* ``dense``: ``model.init_mask=config``, the dense pattern;
* ``longformer``: ``model.init_mask=config``, a sliding window of ``--window`` plus one global token;
* ``dam_s band``: the checkpoint's frozen DAM_s band (the continuation keeps it), the same density class.

Throughput is the tokens/s pretrain.py itself logs (its progress line, ``tok_s``): a run of 2 × ``--warmup``
steps logs every ``--warmup`` steps, and the benchmark takes the second interval (the first holds start-up and the
first passes). No MLflow or Ray is needed once the corpora exist (``--prepare-only`` makes them beforehand, for a
GPU machine without Ray). Peak memory: the child's max RSS (``os.wait4``), host memory. Each speed-up
is printed beside its limit 1 / (1 − share·(1 − d)), share = L / (L + 6H) the attention's share of a layer's
FLOPs and d the mask's density, and the fraction of the limit reached. With ``--repeats`` > 1 the rows of a length
run in turn, repeat after repeat, and the ratio is the median over repeats.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from common import SIZES, load_average, markdown_table, write_report  # noqa: E402

ROWS = ("dense", "longformer", "dam_s band")


def main() -> int:
    args = _parse_args()
    device = torch.device(args.device)
    load_before = load_average()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_pretrain_long_"))
    layers, hidden, heads = SIZES[args.size]
    corpora = _prepare_corpora(work, args.lengths)
    start = _starting_checkpoint(work, corpora[args.lengths[0]], args, max(args.lengths))
    if args.prepare_only:
        print(f"prepared {work}")
        return 0

    results: dict[tuple[int, str], list[dict]] = {}
    rows, header = [], [
        "L", "mask", "backend", "density d", "tokens/s", "speed-up", "limit", "of limit", "peak memory (GiB)",
    ]  # fmt: skip
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        for repeat in range(args.repeats):
            for row in ROWS:
                name = f"L{length}-{row.replace(' ', '_')}-r{repeat}"
                print(
                    f"=== {name} (micro-batch {batch}, {time.strftime('%T')}, {load_average()})", flush=True
                )
                measured = _run(work / name, name, row, length, batch, corpora[length], start, args)
                results.setdefault((length, row), []).append(measured)
        dense = _median(results[(length, "dense")], "tokens_per_s")
        for row in ROWS:
            runs = results[(length, row)]
            speed = statistics.median(
                r["tokens_per_s"] / d["tokens_per_s"]
                for r, d in zip(runs, results[(length, "dense")], strict=True)
            )
            density = _density(row, length, args.window)
            share = length / (length + 6 * hidden)
            limit = 1 / (1 - share * (1 - density))
            rows.append([
                length, row, runs[0]["backend"], density, _median(runs, "tokens_per_s"),
                speed if row != "dense" else 1.0, limit if row != "dense" else None,
                f"{speed / limit:.0%}" if row != "dense" else None,
                max(r["peak_gib"] for r in runs),
            ])  # fmt: skip
        print(f"L={length}: dense {dense:.0f} tokens/s", flush=True)
        _write(args, device, header, rows, load_before, layers, hidden, heads, complete=False)
    _write(args, device, header, rows, load_before, layers, hidden, heads, complete=True)
    return 0


def _write(args, device, header, rows, load_before, layers, hidden, heads, complete: bool) -> None:
    body = (
        f"BERT-{args.size} ({layers} layers, H={hidden}, {heads} heads), "
        f"{'bf16 autocast ' if 'bf16' in args.ds_config else ''}DeepSpeed config {args.ds_config}, one process; "
        f"~{args.tokens} tokens per step (micro-batch = tokens / L), AdamW, window {args.window} for longformer "
        f"(plus 1 global token) and the frozen dam_s band; throughput = the tokens/s pretrain.py logs for its "
        f"last {args.warmup} step(s) of {2 * args.warmup}, "
        f"median of {args.repeats} repeat(s). Speed-up = tokens/s ÷ dense's at the same L; limit = "
        "1/(1 − share·(1 − d)), share = L/(L+6H); 'of limit' = speed-up ÷ limit; attention dropout "
        f"{args.attention_dropout}. Peak memory: max RSS (host) of the pretrain.py process.\n\n"
        + markdown_table(header, rows)
    )
    write_report(args.out, "End-to-end pre-training at long sequences (pretrain.py)", device, body,
                 load_before, complete)  # fmt: skip


def _prepare_corpora(work: Path, lengths: list[int]) -> dict[int, Path]:
    """One corpus per length, full-sentence packing, one tokenizer (trained for the first)."""
    corpora, tokenizer = {}, None
    for length in lengths:
        out = work / f"corpus{length}"
        if not (out / "manifest.json").is_file():  # prepared beforehand where Ray is missing (a GPU machine)
            from data_prep import prepare_corpus, write_python_docs_corpus

            text = write_python_docs_corpus(work / "python_docs.txt")
            settings = {"tokenizer": str(tokenizer)} if tokenizer else {"vocab_size": 8192}
            prepare_corpus([text], out, seq_len=length, packing="full_sentences", seed=0, progress=False,
                           shard_size=4096, num_workers=1, **settings)  # fmt: skip
        corpora[length] = out
        tokenizer = tokenizer or out / "tokenizer"
    return corpora


def _starting_checkpoint(work: Path, corpus: Path, args, max_len: int) -> Path:
    """Random weights with a frozen dam_s band (α = +1 for distances ≤ window, −1 beyond) covering max_len."""
    from transformers import AutoTokenizer

    from sparsebert import SparseBertConfig, SparseBertForPreTraining

    layers, hidden, heads = SIZES[args.size]
    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    config = SparseBertConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
        max_position_embeddings=max_len, attention_pattern={"name": "dam_s", "frozen": True},
    )  # fmt: skip
    torch.manual_seed(0)
    model = SparseBertForPreTraining(config)
    with torch.no_grad():
        alpha = model.mask_source.alpha
        band = torch.arange(alpha.shape[-1]) <= args.window
        alpha.copy_(torch.where(band, 1.0, -1.0).expand_as(alpha))
    out = work / "start"
    model.save_pretrained(out)
    return out


def _run(out, name, row, length, batch, corpus, start, args) -> dict:
    """One pretrain.py process: its logged tokens/s of the last interval, its backend, and peak memory."""
    steps = 2 * args.warmup
    overrides = [
        f"output_dir={out}", f"data.path={corpus}", f"deepspeed_config={args.ds_config}", f"model.init_from={start}",
        f"model.attention_backend={args.backend}", f"train.micro_batch_size={batch}", f"train.max_steps={steps}",
        f"train.log_every={args.warmup}", "train.optimizer=adamw", "train.warmup_steps=1", "data.nsp=false",
        f"model.attention_dropout={args.attention_dropout}", "eval.every=0", "checkpoint.every=0",
        "checkpoint.resume=never", "mlflow.enabled=false", "dam.search_steps=0", "eval.fill_mask=[]",
    ]  # fmt: skip
    if row == "dam_s band":  # dense = no pattern of its own: the checkpoint's frozen band is kept
        overrides += ["model.attention_pattern=dense"]
    elif row == "dense":
        overrides += ["model.init_mask=config", "model.attention_pattern=dense"]
    elif row == "longformer":
        overrides += [
            "model.init_mask=config",
            f"model.attention_pattern={{name: longformer, window: {args.window}, global_tokens: 1}}",
        ]
    cmd = [sys.executable, str(REPO / "sparsebert" / "pretrain.py"), "--config", "tiny_cpu", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"{name}: pretrain.py exited {os.waitstatus_to_exitcode(status)} (log {log})")
    # The progress line shows the latest logged interval's throughput (train.log_every steps; the last one
    # is the measured interval, the first one held start-up).
    rates = [float(x) for x in re.findall(r"tok_s=([0-9.]+)", text)]
    backends = re.findall(r"attention backend (\S+)", text)
    return {
        "tokens_per_s": rates[-1],
        "backend": backends[-1] if backends else "?",
        "peak_gib": usage.ru_maxrss / 2**20,
    }  # fmt: skip  (ru_maxrss: KiB on Linux)


def _density(row: str, length: int, window: int) -> float:
    if row == "dense":
        return 1.0
    distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs()
    allowed = distance <= window
    if row == "longformer":
        allowed[0, :] = True
        allowed[:, 0] = True
    return float(allowed.float().mean())


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="mini", choices=sorted(SIZES), help="BERT size (default mini)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (micro-batch = tokens / L)")
    parser.add_argument("--window", type=int, default=64, help="longformer window and dam_s band half-width")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="steps per logged interval; the run has two, the second is measured",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--attention-dropout", type=float, default=0.1, help="model.attention_dropout")
    parser.add_argument(
        "--prepare-only", action="store_true", help="prepare corpora and checkpoint in --work"
    )
    parser.add_argument("--backend", default="auto", help="model.attention_backend for every row")
    parser.add_argument("--ds-config", default="ds_configs/cpu.json")
    parser.add_argument("--work", help="keep corpora and runs here (default: a temp dir)")
    parser.add_argument("--out", help="markdown report")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
