#!/usr/bin/env bash
# Install everything the test suite needs into .venv and run it (CPU; CI runs exactly this).
# Needs ../shared (the parity fixtures) beside the repository, or REGIONCLIP_SHARED pointing at it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned: the machines of this project carry these two builds on disk
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[dev,eval,demo,hub,train]"
for extra in .ci/install-browser.sh .ci/install-pretrain.sh; do
  [ -f "$extra" ] && bash "$extra"
done
export REGIONCLIP_NO_SKIPS=${REGIONCLIP_NO_SKIPS-1}  # a skip in CI is a missing dependency: fail
echo "== ruff"; .venv/bin/ruff check src tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest (default CPU kernels)"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q -rs "$@"
fi
# the whole suite in one pytest process, as a user's notebook runs export, detect and extract one after another:
# native libraries (ONNX Runtime, OpenVINO, faiss, gradio's servers, Chromium) keep threads and state for the life
# of a process, and a test that leaves one of them broken must fail here rather than be hidden by a fresh process
# per file (that is how OpenVINO's CPU plugins leaving the main thread's alternate signal stack unmapped went
# unnoticed: docs/DEVELOPING.md#known-issues)
.venv/bin/python -m pytest -q -rs -p no:cacheprovider tests
# the parity tests again with the kernels of an AVX2-only CPU: tolerances must hold on other CPUs' rounding
# (docs/DESIGN.md#numerics); a no-op where the CPU has no more than AVX2 anyway
echo "== pytest parity (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q -rs -m parity tests/parity
