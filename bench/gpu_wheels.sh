#!/usr/bin/env bash
# Wheels the GPU campaign needs on the lent GPU machine, whose image (Python 3.12; KINDS.md in the device
# tool's library lists it) has torch, transformers, httpx, prometheus-client and the rest, but not the server's
# and locust's packages, and which reaches no registry. Run here, in the repository root, before a GPU session:
#
#   bench/gpu_wheels.sh            # .whl/ (the server and locust, ~25 MB) and .ort/part-*/ (onnxruntime-gpu)
#
# Then, on the device (calls back to back: a machine idle for 30 s is given back):
#   run(carry=[".ort/part-aa"], "mkdir -p /tmp/ort && cp .ort/part-aa/* /tmp/ort/")      # one call per part
#   ...
#   run(carry=[".whl", ".ort/part-ae"], "cp .ort/part-ae/* /tmp/ort/ && cat /tmp/ort/ort.whl.* > /tmp/ort.whl \
#       && mv /tmp/ort.whl /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl \
#       && python3 -m pip install -q --no-index --no-deps --target /tmp/ortsite /tmp/onnxruntime_gpu-*.whl \
#       && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site python3 -m bench.gpu_campaign $OUT/campaign --ort /tmp/ortsite")
# The wheel names must be kept as pip wrote them (pip reads the version and platform from the name).
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_5_x86_64)
download() {  # into $1, without dependencies (each one is named): the image has the rest
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$1" "${@:2}"
}

rm -rf .whl && mkdir -p .whl
download .whl litserve==0.2.19 uvicorn==0.54.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc opentelemetry-api==1.45.2 \
    pyzmq==27.3.0 locust==2.47.0 gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.5.6 zope.event==6.2 \
    zope.interface==8.7 brotli==1.2.1 flask==3.1.3 flask-cors==6.0.5 flask-login==0.6.3 blinker==1.9.0 \
    itsdangerous==2.2.0 configargparse==1.9.0 python-engineio==4.15.1 python-socketio==5.18.1 bidict \
    simple-websocket wsproto
du -sh .whl

rm -rf .ort && mkdir -p .ort/all
download .ort/all onnxruntime-gpu==1.31.1
(cd .ort/all && split -b 52m ./*.whl ort.whl.)
for part in .ort/all/ort.whl.*; do
    mkdir -p ".ort/part-${part##*.}" && mv "$part" ".ort/part-${part##*.}/"
done
rm -rf .ort/all
ls -d .ort/part-*
