#!/usr/bin/env bash
# Creates ./.venv (seeing the machine's site-packages, so an installed torch is reused),
# installs what the project needs, and builds the extension in place.  Idempotent, and
# quick to repeat: pip runs only for requirements that are missing, and the build only
# when .venv/fused_poolformer-build.stamp no longer matches the sources, torch, Python
# and build switches (scripts/setup_state.py; delete the stamp to force a build).  A
# rebuild of an installed checkout is incremental (ninja, objects kept in build/).
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
STATE="python scripts/setup_state.py"
STAMP=".venv/fused_poolformer-build.stamp"
# torch is among them: the extension is compiled against it (--no-build-isolation below).
NEEDED="$($STATE missing "torch>=2.6" "setuptools>=64" wheel ninja numpy pytest hypothesis psutil timm matplotlib onnx onnxscript onnxruntime)"
# shellcheck disable=SC2086  # word splitting of the requirement list is intended
if [ -n "$NEEDED" ]; then python -m pip install -q $NEEDED; fi
# fvcore is optional; where it cannot be installed (offline), do not try again every run.
if [ -n "$($STATE missing fvcore)" ] && [ ! -e .venv/fused_poolformer-no-fvcore ]; then
  python -m pip install -q fvcore \
    || { touch .venv/fused_poolformer-no-fvcore; echo "fvcore unavailable: MACs will come from torch.utils.flop_counter"; }
fi
if $STATE fresh "$STAMP"; then
  echo "fused_poolformer: extension up to date (sources, torch and build switches unchanged)"
else
  # The inputs are recorded before building: a source edited meanwhile rebuilds next time.
  rm -f "$STAMP"
  $STATE write "$STAMP.new"
  if $STATE installed; then
    python setup.py -q build_ext --inplace 2>&1 | tail -n 20
  else
    python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
  fi
  python -c "import fused_poolformer as f; print('fused_poolformer backends: cpu=%s cuda=%s triton=%s' % (f.HAS_CPU_KERNELS, f.HAS_CUDA_KERNELS, f.triton_available()))"
  mv "$STAMP.new" "$STAMP"
fi
