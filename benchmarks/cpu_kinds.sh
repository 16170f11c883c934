#!/usr/bin/env bash
# Precision on both CPU kinds of this project, side by side on one machine: natively, and with oneDNN and
# ATen limited to AVX2 (what an AVX2-only CPU without native bf16 runs; benchmarks/results/cpu_speed.md).
#   bash benchmarks/cpu_kinds.sh            # about 10 minutes on 2 cores
#   bash benchmarks/cpu_kinds.sh compile    # about 8 minutes: torch.compile against eager instead (below)
# For each kind: the machine line, the demo encoder's compute step in fp32 and bf16 autocast, with and
# without channels_last (throughput.py encoders, interleaved rounds), and 12 steps of the demo's whole
# pretraining (loader, batch views, step; start-up excluded, the first step's warm-up included) under
# run.precision=no, bf16 and auto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
# With `compile`: for each kind, the demo encoder's compute step eager against torch.compile'd (inductor), at
# the precision run.precision=auto takes there, interleaved after each variant's warm-up (and compilation).
for kind in native avx2; do
  if [ "$kind" = avx2 ]; then export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2; fi
  machine=$($PY benchmarks/machine.py)
  echo "== $kind: $machine"
  if [ "${1:-}" = compile ]; then
    precision=$(case "$machine" in *"native bf16: yes"*) echo --bf16-only;; esac)
    $PY benchmarks/throughput.py encoders --batch 128 --rounds 3 --steps 3 --channels-last --compile $precision \
      --only "resnet14t w0.5 deep s2 stem" | tail -2 | sed "s/^/  /"
    continue
  fi
  for layout in --channels-last ""; do
    echo "  throughput.py encoders ${layout:-(contiguous)}:"
    $PY benchmarks/throughput.py encoders --batch 128 --rounds 3 --steps 3 $layout --bf16 \
      --only "resnet14t w0.5 deep s2 stem" 2>/dev/null | tail -2 | sed "s/^/  /"
  done
  for precision in no bf16 auto; do
    rm -rf "$OUT/run"
    $PY pretrain/main.py --config configs/fmnist_cpu.yaml run.dir="$OUT/run" run.precision=$precision \
      run.max_steps=12 run.export=false monitor.knn_every=0 monitor.online_probe=false 2>/dev/null \
      | grep -E "^precision:|steps in" | sed -E "s/^infomax pretraining finished: (step [0-9/]+).*(12 steps in [0-9]+s).*/  \1: \2/" \
      | sed "s/^/  run.precision=$precision: /"
  done
done
