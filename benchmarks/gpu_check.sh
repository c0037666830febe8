#!/usr/bin/env bash
# Everything SparseBERT checks on a GPU, in one run: the fast paths against eager, the benchmarks (tables in
# benchmarks/results/gpu_*_<gpu>.md, copied to $OUT when that is set; among them the measurement that decides
# which backend `auto` picks in inference at L <= 128, benchmarks/bench_auto_short.py), then the end-to-end run
# (benchmarks/gpu_e2e.sh: pre-training under the deepspeed launcher with a kill and a resume, then fine-tuning
# on GLUE and SQuAD), and pretrain.py's own throughput at L=2048/4096, dense against sparse masks
# (benchmarks/bench_pretrain_long.py). Expected to take about 8 minutes on an H100/H200, much of it compiling FlexAttention and
# the models; each step has a hard time limit.
#
#     bash benchmarks/gpu_bundle.sh      # here, once: wheels + data the GPU machine cannot fetch (.gpu_bundle/)
#     bash benchmarks/gpu_check.sh       # on the GPU machine (the device tool: carry [".gpu_bundle"])
#
# The benchmarks need only PyTorch (CUDA), transformers and triton: the package is used from this checkout
# (PYTHONPATH), and importing it pulls in no deepspeed, ray or mlflow. The end-to-end run needs deepspeed,
# installed from .gpu_bundle/wheels when it is missing. Any failure stops the run with a non-zero exit status —
# no GPU, a fast path that disagrees with eager, a benchmark that errors or runs past its time limit,
# FlexAttention falling back to its uncompiled (slow) path, or any step of the end-to-end run. Nothing is
# skipped silently.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RESULTS=benchmarks/results
LOG=$(mktemp -d)/gpu_check.log
mkdir -p "$RESULTS"

save() {  # whatever tables exist so far (benchmarks write them incrementally) go to $OUT too
  if [[ -n "${OUT:-}" ]]; then cp "$RESULTS"/gpu_*"${GPU:-}"*.md "$LOG" "$OUT/" 2>/dev/null || true; fi
}
fail() { echo "gpu_check: FAILED: $*" >&2; save; exit 1; }
step() { echo; echo "=== $* ($(date +%T))"; }

if ! python3 -c "import deepspeed" 2>/dev/null; then  # the GPU machine has no deepspeed: bring the bundle's
  [[ -d .gpu_bundle/wheels ]] || { echo "gpu_check: no deepspeed and no .gpu_bundle/wheels" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_bundle/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

step "environment"
python3 - <<'EOF' || fail "no usable CUDA GPU, or sparsebert pulls in the cluster stack"
import sys
import torch, transformers, triton
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
import sparsebert
stack = {"deepspeed", "ray", "mlflow"} & set(sys.modules)
assert not stack, f"importing sparsebert imported {sorted(stack)}"
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__, "| triton", triton.__version__)
EOF
GPU=$(python3 -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

step "fast paths match eager on GPU (flex forward + backward)"
timeout 150 python3 benchmarks/gpu_sanity.py --device cuda 2>&1 | tee -a "$LOG" \
  || fail "gpu_sanity (exit ${PIPESTATUS[0]}): a fast path disagrees with eager, or it timed out"

step "training step: BERT-base, bf16 autocast, seq 128 and 512"
timeout 200 python3 benchmarks/bench_training.py --device cuda --sizes base --lengths 128 512 --tokens 16384 \
  --bf16 --repeats 5 --out "$RESULTS/gpu_training_${GPU}.md" 2>&1 | tee -a "$LOG" \
  || fail "bench_training (exit ${PIPESTATUS[0]})"

step "attention layer: BERT-base, bf16, L=2048 and 4096, fwd+bwd (L <= 512 is at most 4x4 blocks of 128)"
timeout 200 python3 benchmarks/bench_attention.py --device cuda --size base --dtype bfloat16 \
  --tokens 32768 --lengths 2048 4096 --modes train --backends sdpa flex block_sparse --repeats 5 \
  --out "$RESULTS/gpu_attention_${GPU}.md" 2>&1 | tee -a "$LOG" \
  || fail "bench_attention (exit ${PIPESTATUS[0]})"

step "auto at L <= 128 in inference: flex (one 128-block) vs the rule without flex, BERT-base bf16, L=64 and 128"
# auto sends a fixed sparse mask in GPU inference to flex at any length; the decision line in the results file
# says whether that should stay so at L <= 128 (sparsebert/model/attention.py's choose_backend).
timeout 150 python3 benchmarks/bench_auto_short.py --device cuda --out "$RESULTS/gpu_auto_short_${GPU}.md" 2>&1 \
  | tee -a "$LOG" || fail "bench_auto_short (exit ${PIPESTATUS[0]})"

step "MFU with torch.compile: BERT-base seq 128, reference and dense"
timeout 180 python3 benchmarks/bench_training.py --device cuda --sizes base --lengths 128 --tokens 16384 \
  --bf16 --compile --rows dense "dense, masked_only" --repeats 5 \
  --out "$RESULTS/gpu_training_compiled_${GPU}.md" 2>&1 | tee -a "$LOG" \
  || fail "bench_training --compile (exit ${PIPESTATUS[0]})"

# A FlexAttention call dynamo gave up compiling runs unfused: the numbers would be wrong, not just slow.
if grep -qiE "recompile_limit|cache_size_limit|without torch.compile|unfused implementation" "$LOG"; then
  grep -iE "recompile_limit|cache_size_limit|without torch.compile|unfused implementation" "$LOG" | head -5 >&2
  fail "FlexAttention ran uncompiled somewhere (see above)"
fi

step "end to end at long sequences: pretrain.py tokens/s, dense vs longformer vs a frozen DAM_s band, L=2048 and 4096"
# Corpora come from the bundle (no Ray here): benchmarks/bench_pretrain_long.py --prepare-only --work .gpu_bundle/pretrain_long
[[ -f .gpu_bundle/pretrain_long/corpus4096/manifest.json ]] \
  || fail "no .gpu_bundle/pretrain_long corpora: run bench_pretrain_long.py --prepare-only --lengths 2048 4096 there"
timeout 240 python3 benchmarks/bench_pretrain_long.py --device cuda --size small --lengths 2048 4096 --tokens 32768 \
  --warmup 3 --ds-config ds_configs/zero0_bf16.json --work .gpu_bundle/pretrain_long \
  --out "$RESULTS/gpu_pretrain_long_${GPU}.md" 2>&1 | tee -a "$LOG" \
  || fail "bench_pretrain_long (exit ${PIPESTATUS[0]})"

step "end to end: pre-training (DAM_s search, freeze, kill, resume) then GLUE + SQuAD fine-tuning"
E2E=$(mktemp -d)
E2E_OUT=$E2E timeout 300 bash benchmarks/gpu_e2e.sh cuda 2>&1 | tee -a "$LOG" || fail "gpu_e2e (exit ${PIPESTATUS[0]})"
cp "$E2E/summary.md" "$RESULTS/gpu_e2e_${GPU}.md"

save
grep -h "^Decision" "$RESULTS/gpu_auto_short_${GPU}.md" || true
step "done: $RESULTS/gpu_{training,attention,auto_short,training_compiled,pretrain_long,e2e}_${GPU}.md"
