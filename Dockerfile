# Reformer inference server image.
#   GPU (default): docker build -t reformer-server .
#                  docker run --gpus all -p 8000:8000 reformer-server
#   CPU:           docker build --build-arg BASE=ubuntu:24.04 \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t reformer-server:cpu .
# Configuration: REFORMER_<OPTION> environment variables (REFORMER_MODEL, REFORMER_MAX_RUNNING, ...; see
# `python -m server --help`). SIGTERM drains in-flight requests: allow --drain-timeout and a few seconds more.

# CUDA 13: what the pinned torch==2.13.0 and onnxruntime-gpu 1.31 are built for. Ubuntu 24.04 either way,
# so both images install Python 3.12 the same way.
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
# Where pip also looks for torch: the CPU image points it at PyTorch's CPU wheels (no CUDA libraries).
ARG TORCH_INDEX=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${TORCH_INDEX} \
    PROMETHEUS_MULTIPROC_DIR=/tmp/reformer-metrics REFORMER_HOST=0.0.0.0 REFORMER_PORT=8000
RUN useradd --create-home --uid 10001 reformer
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY export ./export
COPY loadtest ./loadtest
COPY bench ./bench
# The README's install step, word for word (tests/test_deploy.py keeps them the same).
RUN python3 -m venv .venv && .venv/bin/pip install -e . && chown -R reformer /app
ENV PATH=/app/.venv/bin:$PATH
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# tini forwards SIGTERM to the server (which drains) and reaps its worker processes.
ENTRYPOINT ["tini", "--", "python", "-m", "server"]
