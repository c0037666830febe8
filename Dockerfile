# SparseBERT on CUDA GPUs: PyTorch 2.13.0 (the release the test suite runs on) with CUDA 13.0, the project at the
# tested versions (cluster/constraints.txt), run by a non-root user who owns its working directory.
#   docker build -t sparsebert .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/home/sparsebert/app/runs" sparsebert \
#       deepspeed --num_gpus 8 sparsebert/pretrain.py --config bert_base_phase1 output_dir=runs/base
# The hub stays reachable; `-e HF_HUB_OFFLINE=1` keeps a container off it. `bash cluster/docker_smoke.sh` builds
# the image and runs the demo and a launcher test in it.
#
# The base is PyTorch's own image of that release, the devel variant (nvcc and headers, for the ops DeepSpeed
# compiles on first use), pinned by the digest published for the tag; refresh tag and digest together
# (`docker buildx imagetools inspect <tag>`). CUDA 13.0 needs an NVIDIA driver >= 580.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel@sha256:c74b2049d204a55233abace509fdb1f6bdbe2d169bee382ed2f06cac00ba76c4

# s3/gcs: object storage for data.path and output_dir (cluster/MULTINODE.md); the smoke test adds `test`.
ARG EXTRAS=s3,gcs

# PIP_BREAK_SYSTEM_PACKAGES: the image is the environment, so pip may install into the base's Python even where
# that Python is the distribution's own (PEP 668). HF_HUB_OFFLINE is deliberately not set here.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# pdsh/ssh let the deepspeed launcher start ranks on other nodes; git records the commit in MLflow; a C++
# toolchain and Python's headers build DeepSpeed's ops (python-is-python3 and python3-dev only where the base's
# Python is the system one). Installing openssh-server generates SSH host keys: removed in the same layer, or
# every container of this image would share one private host key. A container that runs sshd makes its own at
# start (`ssh-keygen -A`, see cluster/MULTINODE.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential git openssh-client openssh-server pdsh \
    && if ! command -v python >/dev/null; then apt-get install -y --no-install-recommends python-is-python3; fi \
    && if ! python -c 'import os, sysconfig; assert os.path.isfile(sysconfig.get_paths()["include"] + "/Python.h")'; then \
        apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -f /etc/ssh/ssh_host_* \
    && rm -rf /var/lib/apt/lists/*

# uid 1000, which Ubuntu images give to a user of their own: that one goes. The working directory belongs to
# the user, so runs/, mlflow.db and caches can be written where the README's commands put them.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --shell /bin/bash --uid 1000 sparsebert \
    && install -d -o sparsebert -g sparsebert /home/sparsebert/app
WORKDIR /home/sparsebert/app

# Dependencies first (cached while only the code changes), at the tested versions. The base's torch satisfies
# the pin (torch==2.13.0 matches its 2.13.0+cu130), so pip keeps it; the check says so if that ever changes.
COPY --chown=sparsebert:sparsebert pyproject.toml README.md ./
COPY --chown=sparsebert:sparsebert cluster/constraints.txt ./cluster/
COPY --chown=sparsebert:sparsebert sparsebert ./sparsebert
COPY --chown=sparsebert:sparsebert data_prep ./data_prep
COPY --chown=sparsebert:sparsebert eval ./eval
RUN pip install -c cluster/constraints.txt -e ".[${EXTRAS}]" \
    && pinned=$(sed -n 's/^torch==//p' cluster/constraints.txt) \
    && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '$pinned' and torch.version.cuda, v" \
    && chown -R sparsebert:sparsebert /home/sparsebert/app

COPY --chown=sparsebert:sparsebert . .
USER 1000

CMD ["python", "sparsebert/pretrain.py", "--help"]
