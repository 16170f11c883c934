#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root, about 3 minutes):
#   1. the tests marked `gpu`;  2. pretraining throughput, resnet50 224 px bf16 channels_last, synthetic batches.
# Figures go to $OUT (when set) as gpu_tests.txt and throughput.json.
# The device machine has torch/timm/accelerate/tensorboard/safetensors; other wheels (omegaconf, ...)
# must be carried in wheels/ (pip download -d wheels omegaconf antlr4-python3-runtime ruamel.yaml pytest-timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -d wheels ]; then $PY -m pip install -q --no-index --find-links wheels omegaconf ruamel.yaml pytest-timeout || true; fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"
$PY benchmarks/throughput.py train-step --arch resnet50 --size 224 --batch 128 --precision bf16 --channels-last \
  --seconds 100 --json "$OUT/throughput.json"
