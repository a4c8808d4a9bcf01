#!/usr/bin/env bash
# The GPU check of issue 18, on one H100/H200: finishes inside 8 minutes (the driver stops itself at 7.5,
# this wrapper kills it at 7.9) and writes a JSON summary of every figure (--out, default
# bench/gpu-check.json) with a Markdown table beside it. Run from anywhere; --smoke is the CPU dry run.
#
# On the device machine (no package registry there), after `bash bench/gpu_wheels.sh` here, one `run` call
# with carry [".whl"] and timeout_s 560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu_check.sh --out $OUT/gpu-check.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: bench/gpu_check.sh \
needs one (bench/gpu_check.sh --smoke is the CPU dry run)')"
fi
timeout -k 5 475 "$PY" bench/gpu_check.py "$@"
