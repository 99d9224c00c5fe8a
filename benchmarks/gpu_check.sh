#!/usr/bin/env bash
# The prepared device check of issue 24 (< 5 minutes on one H100): RN50 and RN50x4 RPN-1000, float32 / trusted
# bf16 / plain bf16 scan: images/s, per-stage ms, peak memory, agreement with the float32 CPU result.
# Extra arguments go to benchmarks/gpu_check.py, e.g. a CPU smoke run:
#   bash benchmarks/gpu_check.sh --device cpu --models tiny --batch 2 --proposals 40 --classes 65
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
echo "# $(date -u +%FT%TZ) $(uptime)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" benchmarks/gpu_check.py "$@"
