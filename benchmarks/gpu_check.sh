#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root, about 6 minutes):
#   1. the tests marked `gpu`;  2. the real pretraining step (benchmarks/gpu_step.py: a generated ImageNet-shaped
#   .beton, the FFCV loader, batch colour steps, SyncBN and NCCL on every GPU, synchronising calls counted; with
#   two or more GPUs also the eval's imagenet protocol and split kNN over NCCL);  3. the synthetic throughput,
#   resnet50 224 px bf16 channels_last.
# Each part runs whatever the others did, and records its outcome; the exit status is the first failure's.
# Figures go to $OUT (when set): gpu.txt, gpu_tests.txt, gpu_step.json (+ logs), throughput.json.
# The device machine has torch/timm/accelerate/tensorboard/safetensors; other wheels (omegaconf, ...)
# must be carried in wheels/ (pip download -d wheels omegaconf antlr4-python3-runtime ruamel.yaml pytest-timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -d wheels ]; then $PY -m pip install -q --no-index --find-links wheels omegaconf ruamel.yaml pytest-timeout || true; fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
note() { echo "gpu_check: $1 exited $2" | tee -a "$OUT/gpu.txt"; [ "$status" = 0 ] && status=$2; return 0; }
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt"; note "gpu tests" "${PIPESTATUS[0]}"
$PY benchmarks/gpu_step.py --out "$OUT/step" --steps 60 --batch 128; rc=$?
cp "$OUT/step/gpu_step.json" "$OUT/gpu_step.json" 2>/dev/null; note "real step" "$rc"
$PY benchmarks/throughput.py train-step --arch resnet50 --size 224 --batch 128 --precision bf16 --channels-last \
  --seconds 100 --json "$OUT/throughput.json"; note "throughput" "$?"
exit "$status"
