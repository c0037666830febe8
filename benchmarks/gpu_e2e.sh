#!/usr/bin/env bash
# The real thing on one device, end to end: pre-training under the `deepspeed` launcher, then fine-tuning.
#
#     bash benchmarks/gpu_e2e.sh [cuda|cpu]      # cuda (default) on the GPU machine; cpu rehearses it here
#
# The CPU rehearsal runs bf16 autocast only on a CPU with native bf16 (AVX512-BF16 or AMX). Elsewhere bf16 is
# emulated: on a 2-core AVX2 EPYC a 512x1024 by 1024x1024 bf16 matmul took 1.37 s against 23 ms in fp32, and
# the rehearsal ran at 79 tokens/s (60 steps: over an hour). There it runs fp32, the same ZeRO-2 config
# without torch_autocast, and says so; the GPU always runs bf16 autocast.
#
# 1. pretrain.py, BERT-mini, bf16 autocast + ZeRO-2 (ds_configs/zero2_bf16.json), a DAM_s search (20 steps),
#    frozen, then the fixed mask to step 60; checkpoints every 20 steps. The first launch is killed right after
#    the step-40 checkpoint (the SPARSEBERT_FAULTS=crash_after_step hook: SIGKILL, as a preemption would), the same
#    command resumes it and finishes. A world of one still forms a process group (NCCL on GPU), so every
#    collective of a multi-GPU run runs here too.
# 2. The export is checked: it loads, its mask is the frozen one, the losses are finite.
# 3. The export is fine-tuned on two GLUE tasks (SST-2, MRPC) and SQuAD v1.1 through eval.finetune.run_job on
#    the device ("cuda" is required: a job that cannot see the GPU fails instead of running on the CPU), with
#    bf16 autocast on GPU. Ray and MLflow are not on the GPU machine, so the jobs run in this process (what
#    `python -m eval.run --no-ray` does, minus the MLflow records).
#
# Data and the missing packages come from .gpu_bundle/ (benchmarks/gpu_bundle.sh builds it here; it travels
# with the working tree). Exits non-zero on any failure. Output: $E2E_OUT (default: a temp dir), summary in
# $E2E_OUT/summary.md.
set -euo pipefail

DEVICE=${1:-cuda}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
BUNDLE=.gpu_bundle
WORK=${E2E_OUT:-$(mktemp -d)}
RUN=$WORK/pretrain
mkdir -p "$WORK"
[[ -f $BUNDLE/corpus/manifest.json ]] || { echo "gpu_e2e: no $BUNDLE/corpus: run benchmarks/gpu_bundle.sh" >&2; exit 1; }

fail() { echo "gpu_e2e: FAILED: $*" >&2; exit 1; }
step() { echo; echo "=== gpu_e2e: $* ($(date +%T))"; }

DS_CONFIG=ds_configs/zero2_bf16.json PRECISION="bf16 autocast"
if [[ $DEVICE == cpu ]]; then
  CPU_BF16=$(python3 -c 'import torch
caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
native = caps.get("avx512_bf16") or caps.get("amx_bf16")
print("yes" if native else "no", torch.backends.cpu.get_cpu_capability())')
  if [[ $CPU_BF16 == no* ]]; then
    DS_CONFIG=$WORK/zero2_fp32.json PRECISION="fp32"
    python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); c.pop("torch_autocast"); json.dump(c, open(sys.argv[2], "w"))' \
      ds_configs/zero2_bf16.json "$DS_CONFIG"
    echo "gpu_e2e: this CPU has no native bf16 (torch CPU capability ${CPU_BF16#no }): rehearsing in fp32," \
      "ds_configs/zero2_bf16.json without torch_autocast; the GPU run uses bf16 autocast"
  fi
fi

PRETRAIN=(
  python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29517 sparsebert/pretrain.py
  --config tiny_cpu output_dir="$RUN" data.path="$BUNDLE/corpus" deepspeed_config="$DS_CONFIG"
  model.size=mini model.max_position_embeddings=128 "model.attention_pattern={name: dam_s, lambda: 1.0e-4}"
  train.max_steps=60 dam.search_steps=20 train.micro_batch_size=32 train.grad_accum_steps=2
  train.optimizer=adamw train.lr=1e-3 train.warmup_steps=10 train.log_every=10
  checkpoint.every=20 checkpoint.keep_last=2 mlflow.enabled=false
)

step "pre-training on $DEVICE ($PRECISION), killed after the step-40 checkpoint"
if SPARSEBERT_FAULTS=crash_after_step=40 "${PRETRAIN[@]}" >"$WORK/pretrain_1.log" 2>&1; then
  tail -20 "$WORK/pretrain_1.log"; fail "the first launch should have been killed after step 40"
fi
grep -E "^(device|stage|output)" "$WORK/pretrain_1.log" || true
[[ $(cat "$RUN/checkpoints/latest") == step00000040 ]] || { tail -30 "$WORK/pretrain_1.log"; fail "no step-40 checkpoint"; }

step "resuming from step 40 to step 60"
"${PRETRAIN[@]}" >"$WORK/pretrain_2.log" 2>&1 || { tail -40 "$WORK/pretrain_2.log"; fail "the resumed launch"; }
grep -q "resumed from step00000040 at step 40 (stage 2)" "$WORK/pretrain_2.log" || fail "did not resume from step 40"
grep -E "^(device|stage|resumed|done)" "$WORK/pretrain_2.log"

step "the export, and fine-tuning it on SST-2, MRPC and SQuAD v1.1 on $DEVICE"
python3 - "$RUN" "$DEVICE" "$BUNDLE/tasks" "$WORK/summary.md" "$PRECISION" <<'EOF'
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from eval.finetune import run_job
from eval.jobs import DataSource, FinetuneConfig, Job
from sparsebert import SparseBertForPreTraining, sparsity

run, device, tasks, summary, precision = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
logs = (run.parent / "pretrain_1.log").read_text() + (run.parent / "pretrain_2.log").read_text()
losses = [float(x) for x in re.findall(r"loss=([0-9.naif+-]+)", logs)]
assert losses and all(torch.isfinite(torch.tensor(losses))), f"non-finite or missing losses: {losses[-5:]}"
model = SparseBertForPreTraining.from_pretrained(run / "final")
frozen = load_file(run / "masks" / "stage1_frozen.rank0.safetensors")["mask"]
assert model.config.attention_pattern["frozen"], "the exported mask is not frozen"
assert torch.equal(model.current_mask(128), frozen), "the exported mask is not the frozen one"
lines = [
    f"# End-to-end run on {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}",
    "",
    f"torch {torch.__version__}; pre-training BERT-mini, DAM_s searched 20 steps then frozen (sparsity "
    f"{sparsity(frozen):.1%}), 60 steps, {precision} + ZeRO-2, killed after step 40 and resumed; "
    f"loss {losses[0]:.3f} -> {losses[-1]:.3f}.",
    "",
    *[line for line in logs.splitlines() if line.startswith(("device:", "stage ", "resumed from"))],
    "",
    "| task | device | steps | seconds | dev metrics |",
    "|---|---|---|---|---|",
]
# SQuAD at 128 too: the mask was searched at 128, and a DAM mask has no defined rule beyond its search length.
config = FinetuneConfig(
    device=device, bf16=device == "cuda", epochs=1, batch_size=32, max_seq_len=128, squad_max_seq_len=128,
    doc_stride=32, max_steps=40,
)  # fmt: skip
data = DataSource(glue_dir=str(tasks / "glue"), squad_dir=str(tasks / "squad"))
for task in ("sst2", "mrpc", "squad"):
    start = time.perf_counter()
    result = run_job(Job(str(run / "final"), task, 1e-4, 1, config, data))
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items())
    assert all(v == v for v in result["metrics"].values()), f"{task}: NaN metric {result['metrics']}"
    if device == "cuda":
        assert result["device"] == torch.cuda.get_device_name(0), f"{task} ran on {result['device']}"
    lines.append(
        f"| {task} | {result['device']} | {result['steps']} | {time.perf_counter() - start:.1f} | {metrics} |"
    )
    print(lines[-1], flush=True)
summary.write_text("\n".join(lines) + "\n")
print(summary.read_text())
EOF
step "done: $WORK/summary.md"
