#!/usr/bin/env bash
# Build .gpu_bundle/ (git-ignored): what a SparseBERT run on the lent GPU machine needs and cannot fetch
# there. That machine has Python 3.12 with torch, transformers, triton and pyarrow but no deepspeed, ray or
# mlflow, and reaches no package registry, so everything else travels in this folder:
#
#   wheels/   deepspeed (built here from its sdist, no ops prebuilt: they JIT-compile on the GPU), the
#             packages it and sparsebert import that the GPU image lacks, for CPython 3.12 manylinux x86_64
#             (benchmarks/gpu_bundle_packages.txt); the versions are the ones installed here, so the GPU runs
#             the stack the tests ran with
#   corpus/   the embedded Python-docs corpus, prepared as sparsebert.train.corpus.prepare_default_corpus does
#   tasks/    glue/ and squad/ from eval/smoke.py's writers (official formats, random sentences), small enough
#             that fine-tuning a BERT-mini on them takes seconds
#
#     bash benchmarks/gpu_bundle.sh        # rebuilds it from scratch, then runs benchmarks/check_bundle.py
#
# On the GPU machine (the device tool's run with carry [".gpu_bundle"]), start the command with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .gpu_bundle/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Ray, MLflow and HF datasets are not carried: use the entry points that do not need them there
# (pre-training with mlflow.enabled=false, eval.finetune's jobs directly rather than the Ray driver eval.run).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=.gpu_bundle
# Every package carried (benchmarks/gpu_bundle_packages.txt, deepspeed first); benchmarks/check_bundle.py fails if
# one is missing from what the GPU run imports, or carried for no reason.
mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' benchmarks/gpu_bundle_packages.txt)
if [[ ${PACKAGES[0]:-} != deepspeed ]]; then
  echo "gpu_bundle: FAILED: benchmarks/gpu_bundle_packages.txt must list deepspeed first" >&2
  exit 1
fi
GLUE_TRAIN=512 GLUE_DEV=128    # rows per GLUE task and split
SQUAD_TRAIN=128 SQUAD_DEV=64   # paragraphs (one question each in v1.1) per SQuAD split

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bundle.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
OUTDIR=$STAGE/bundle
mkdir -p "$OUTDIR/wheels" "$STAGE/src"

step() { echo "gpu_bundle: $* ($(date +%T))"; }
quiet() {  # run "$@" with its output kept back, shown only if it fails
  if ! "$@" >"$STAGE/step.log" 2>&1; then
    cat "$STAGE/step.log" >&2
    echo "gpu_bundle: FAILED: $*" >&2
    exit 1
  fi
}

mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")  # fails (and so does the script) if one is not installed here
EOF
)
if [[ ${#PINS[@]} -ne ${#PACKAGES[@]} ]]; then
  echo "gpu_bundle: FAILED: not all of ${PACKAGES[*]} are installed here" >&2
  exit 1
fi
echo "gpu_bundle: versions (as installed here): ${PINS[*]}"

step "building the ${PINS[0]} wheel from its sdist, DS_BUILD_OPS=0"
# No DS_BUILD_<OP>=1 from the caller's environment may prebuild an op. No build isolation: DeepSpeed's
# setup.py imports torch, which an isolated build would download; with no op built, the torch it sees only
# fills in torch_info, which DeepSpeed consults for prebuilt ops alone.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^DS_BUILD_' || true)
quiet env DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir \
  --no-binary deepspeed -w "$OUTDIR/wheels" "${PINS[0]}"

step "downloading ${PINS[*]:1} (cp312 manylinux x86_64)"
quiet "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUTDIR/wheels" "${PINS[@]:1}"

step "preparing the embedded Python-docs corpus (wordpiece 8192, seq 128, seed 0, 4096 samples a shard)"
# The parameters of sparsebert.train.corpus.prepare_default_corpus, so this is the demo's corpus.
"$PY" -c 'import sys; from data_prep import write_python_docs_corpus; write_python_docs_corpus(sys.argv[1])' \
  "$STAGE/src/python_docs.txt"
quiet "$PY" -m data_prep --input "$STAGE/src/python_docs.txt" --output "$OUTDIR/corpus" \
  --train-tokenizer wordpiece --vocab-size 8192 --seq-len 128 --seed 0 --shard-size 4096 --no-progress

step "preparing the long-context corpora and checkpoint of benchmarks/bench_pretrain_long.py (small, L=2048, 4096)"
quiet "$PY" benchmarks/bench_pretrain_long.py --prepare-only --size small --lengths 2048 4096 \
  --work "$OUTDIR/pretrain_long"
rm -r "$OUTDIR/pretrain_long/start" "$OUTDIR/pretrain_long/python_docs.txt"  # remade on the GPU: only the corpora travel

step "writing GLUE ($GLUE_TRAIN/$GLUE_DEV rows a task) and SQuAD ($SQUAD_TRAIN/$SQUAD_DEV paragraphs) files"
"$PY" - "$OUTDIR/tasks" "$GLUE_TRAIN" "$GLUE_DEV" "$SQUAD_TRAIN" "$SQUAD_DEV" <<'EOF'
import sys
from pathlib import Path

from eval.smoke import write_glue, write_squad

out = Path(sys.argv[1])
glue_train, glue_dev, squad_train, squad_dev = map(int, sys.argv[2:])
write_glue(out / "glue", n_train=glue_train, n_dev=glue_dev, seed=0)
write_squad(out / "squad", n_train=squad_train, n_dev=squad_dev, seed=0)  # v1.1 and v2.0 files
EOF

cat >"$OUTDIR/README.txt" <<EOF
Built by benchmarks/gpu_bundle.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); checked by benchmarks/check_bundle.py.
Install on the GPU machine (Python 3.12):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
    .gpu_bundle/wheels/*.whl && export PYTHONPATH=/tmp/site:\$PWD
wheels: ${PINS[*]}
corpus: the embedded Python-docs corpus (data_prep: wordpiece 8192, seq 128, seed 0, shard size 4096)
tasks:  glue/ (${GLUE_TRAIN} train / ${GLUE_DEV} dev rows a task),
        squad/ (${SQUAD_TRAIN} train / ${SQUAD_DEV} dev paragraphs, v1.1 and v2.0)
EOF

rm -rf "$BUNDLE"
mv "$OUTDIR" "$BUNDLE"
ls -l "$BUNDLE/wheels"
bytes=$(du -sb "$BUNDLE" | cut -f1)
echo "gpu_bundle: $BUNDLE is $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB (%d bytes)", b / 1048576, b }')"

step "checking it"
"$PY" benchmarks/check_bundle.py --bundle "$BUNDLE"
