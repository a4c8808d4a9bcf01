#!/usr/bin/env bash
# GPU benchmark (about 135M and 1B random-initialised Llama models, packed 2048-token rows, bf16, full
# and LoRA): finishes within 8 minutes on one H100/H200. Run from the repository root. The whole GPU check
# (tests, every GPU path, the side-by-side with HF Trainer and TRL) is bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: bench/gpu.sh needs one')"
timeout 480 "$PY" bench/gpu.py "$@" | tee bench/gpu-results.md
