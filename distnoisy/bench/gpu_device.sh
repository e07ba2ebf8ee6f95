#!/usr/bin/env bash
# The headline GPU measurement, for an accelerator machine that has torch, torchvision, numpy
# and pillow (nothing else is needed: no Ray, MLflow, OmegaConf, WebDataset or pyarrow).
# Run from the repository root:  bash distnoisy/bench/gpu_device.sh [extra bench options]
# Writes $OUT/gpu.json (every round's images/s, peak memory, device, driver, versions, date)
# and $OUT/benchmarks_gpu.md (the section for docs/benchmarks.md). One command, one timeout.
set -euo pipefail
OUT=${OUT:-/tmp/distnoisy-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'cuda', torch.cuda.is_available())"
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout "${GPU_BENCH_TIMEOUT:-540}" "$PY" -m distnoisy.bench gpu --device cuda \
  --model resnet50 --image-size 224 --batch 256 --precision bf16 --channels-last \
  --steps 30 --warmup 5 --repeats 3 --loader-workers "$WORKERS" \
  --json "$OUT/gpu.json" --doc "$OUT/benchmarks_gpu.md" "$@"
