# SparseBERT on CUDA GPUs: PyTorch + CUDA base, the project installed, running as a non-root user.
#   docker build -t sparsebert .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/home/sparsebert/app/runs" sparsebert \
#       deepspeed --num_gpus 8 sparsebert/pretrain.py --config bert_base_phase1
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# pdsh/ssh let the deepspeed launcher start ranks on other nodes; git records the commit in MLflow.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client openssh-server pdsh \
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
