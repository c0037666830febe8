#!/usr/bin/env bash
# Build the Docker image and run in it what README promises: the demo, offline, written into the working
# directory by the image's non-root user, and a test through the deepspeed launcher (cluster/pretrain.sbatch
# on 2 CPU ranks: Slurm's warning signal, a checkpoint on every rank, exit 0, the resume). Needs Docker and the
# network for the build; no GPU (the containers run on the CPU). CI has no Docker daemon: it lints the
# Dockerfile (hadolint) and this script (shellcheck) but runs neither.
#
#   bash cluster/docker_smoke.sh [image tag]     # default sparsebert:smoke
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-sparsebert:smoke}

step() { printf '\n== %s\n' "$*"; }

step "build $tag (with the test extra)"
docker build --build-arg EXTRAS=s3,gcs,test -t "$tag" .

# Shared memory for Ray and DeepSpeed's CPU all-reduce; Docker's default 64 MB is too little.
run() { docker run --rm --shm-size=2g "$@"; }

step "the image: the tested torch in a CUDA build, a non-root user owning its working directory, the hub on"
pinned=$(sed -n 's/^torch==//p' cluster/constraints.txt)
run -i "$tag" python - "$pinned" <<'EOF'
import os, sys, torch
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda, torch.__version__
assert os.getuid() != 0 and os.access(os.getcwd(), os.W_OK), (os.getuid(), os.getcwd())
assert "HF_HUB_OFFLINE" not in os.environ, "the image must not switch the hub off"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), uid {os.getuid()}, {os.getcwd()} writable")
EOF

step "the demo, offline (-e HF_HUB_OFFLINE=1, as docs/cluster.md says to opt out of the hub)"
run -e HF_HUB_OFFLINE=1 "$tag" bash -c 'python sparsebert/pretrain.py && test -f runs/demo/final/config.json'

step "a launcher test: cluster/pretrain.sbatch on 2 CPU ranks, USR1, checkpoint, resume"
run -e DS_ACCELERATOR=cpu "$tag" python -m pytest -x -q -p no:cacheprovider tests/test_cluster_launch.py -k sbatch

step "docker smoke test passed ($tag)"
