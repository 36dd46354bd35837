#!/usr/bin/env bash
# Creates ./.venv (seeing the machine's site-packages, so an installed torch is reused),
# installs what the project needs, and builds the extension in place.  Idempotent.
# Source it: `source scripts/setup_env.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
# torch first: the extension is compiled against it (--no-build-isolation below).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch>=2.6"
python -m pip install -q "setuptools>=64" wheel ninja numpy pytest hypothesis psutil timm tqdm matplotlib
python -m pip install -q fvcore || echo "fvcore unavailable: MACs will come from torch.utils.flop_counter"
# CUDA_HOME from the toolkit that holds libcudart (setup.py finds it; export for clarity).
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
python -c "import fused_poolformer as f; print('fused_poolformer backends: cpu=%s cuda=%s triton=%s' % (f.HAS_CPU_KERNELS, f.HAS_CUDA_KERNELS, f.triton_available()))"
