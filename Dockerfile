# Reformer inference server image.
#   GPU (default): docker build -t reformer-server .
#                  docker run --gpus all -p 8000:8000 reformer-server
#   CPU:           docker build --build-arg BASE=ubuntu:24.04 \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t reformer-server:cpu .
# Configuration: REFORMER_<OPTION> environment variables (REFORMER_MODEL, REFORMER_MAX_RUNNING, REFORMER_PORT,
# ...; see `python -m server --help`). SIGTERM drains in-flight requests: allow --drain-timeout and 10 s more.
# It runs with a read-only root filesystem: only /tmp must be writable (a tmpfs or an emptyDir, not noexec:
# Triton loads the launchers it compiles from its cache there). deploy/check_image.sh builds and checks it.

# CUDA 13: what the pinned torch==2.13.0 and onnxruntime-gpu 1.31 are built for.
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
# The only index PyTorch is installed from. PyPI's torch is the CUDA build; the CPU image points this at
# PyTorch's CPU wheels. If it cannot be reached the build fails (no fallback to PyPI's CUDA torch).
ARG TORCH_INDEX=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive
# On CUDA bases (they set CUDA_VERSION) also a C compiler and Python's headers: Triton, which runs the fused
# attention kernel on GPUs, compiles a small launcher for each kernel the first time it runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && if [ -n "${CUDA_VERSION:-}" ]; then \
           apt-get install -y --no-install-recommends gcc libc6-dev python3-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# No home directory in the image: HOME is under /tmp, the one writable place at run time.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp/reformer --shell /usr/sbin/nologin reformer
WORKDIR /app
# PyTorch first, alone, from TORCH_INDEX alone (--index-url, not an extra index). Its version is pyproject's
# pin (tests/test_deploy.py keeps them equal), so the install below keeps it and only adds its dependencies.
RUN python3 -m venv /app/.venv \
    && /app/.venv/bin/pip install --no-deps --index-url "$TORCH_INDEX" torch==2.13.0
# The runtime only: no training/, bench/, tests/ (and .dockerignore keeps them out of the build context).
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
COPY export ./export
# The README's install step, word for word (tests/test_deploy.py keeps them the same); the code stays owned
# by root, and its bytecode is compiled here since nothing can write it at run time.
RUN python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m compileall -q model server export
# Everything the server, Python, PyTorch and Triton write goes under /tmp.
ENV PATH=/app/.venv/bin:$PATH HOME=/tmp/reformer XDG_CACHE_HOME=/tmp/reformer/.cache \
    TRITON_CACHE_DIR=/tmp/reformer/.triton TORCHINDUCTOR_CACHE_DIR=/tmp/reformer/torchinductor \
    MPLCONFIGDIR=/tmp/reformer/matplotlib PROMETHEUS_MULTIPROC_DIR=/tmp/reformer-metrics \
    REFORMER_HOST=0.0.0.0 REFORMER_PORT=8000
USER 10001
EXPOSE 8000
# Follows REFORMER_PORT (set it, not --port, to move the server).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REFORMER_PORT', '8000'), timeout=4)"]
# tini forwards SIGTERM to the server (which drains) and reaps its worker processes.
ENTRYPOINT ["tini", "--", "python", "-m", "server"]
