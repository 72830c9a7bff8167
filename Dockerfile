# GPU image of the project. For now it runs the model-core benchmark against the reference on the GPU it
# is given (docker run --gpus all IMAGE); the server entrypoint replaces this command when it exists.
# CUDA 13 runtime: the CUDA of the pinned torch==2.13.0 and of onnxruntime-gpu 1.27+.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 reformer
WORKDIR /app
COPY --chown=reformer pyproject.toml README.md ./
COPY --chown=reformer model ./model
COPY --chown=reformer bench ./bench
COPY --chown=reformer server ./server
COPY --chown=reformer export ./export
COPY --chown=reformer loadtest ./loadtest

# The same install step as the README.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet -e '.[test]' && chown -R reformer /app
ENV PATH=/opt/venv/bin:$PATH
USER reformer
CMD ["python", "-m", "bench.bench_core"]
