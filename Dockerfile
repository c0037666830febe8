# SparseBERT on CUDA GPUs: PyTorch + CUDA base, the project installed, running as a non-root user.
#   docker build -t sparsebert .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/home/sparsebert/app/runs" sparsebert \
#       deepspeed --num_gpus 8 sparsebert/pretrain.py --config bert_base_phase1
# Pinned by digest (the tag's linux/amd64 image) so a rebuild gets the same base; refresh both together.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel@sha256:0cf3402e946b7c384ba943ee05c90b4c5a4a05227923921f2b0918c011cfaf56

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# pdsh/ssh let the deepspeed launcher start ranks on other nodes; git records the commit in MLflow.
# Installing openssh-server generates SSH host keys: removed in the same layer, or every container of this
# image would share one private host key. A container that runs sshd makes its own at start (`ssh-keygen -A`,
# see cluster/MULTINODE.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client openssh-server pdsh \
    && rm -f /etc/ssh/ssh_host_* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --shell /bin/bash --uid 1000 sparsebert
WORKDIR /home/sparsebert/app

# Dependencies first (cached while only the code changes); the base image's torch satisfies the pin.
COPY --chown=sparsebert:sparsebert pyproject.toml README.md ./
COPY --chown=sparsebert:sparsebert sparsebert ./sparsebert
COPY --chown=sparsebert:sparsebert data_prep ./data_prep
COPY --chown=sparsebert:sparsebert eval ./eval
RUN pip install -e .

COPY --chown=sparsebert:sparsebert . .
USER 1000

CMD ["python", "sparsebert/pretrain.py", "--help"]
