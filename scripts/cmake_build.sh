#!/usr/bin/env bash
# Builds the operator library with CMake against the installed libtorch (no Python binding):
#   bash scripts/cmake_build.sh BUILD_DIR [extra cmake args, e.g. -DFUSED_POOLFORMER_CUDA=ON]
# or, with --source, another CMake project against the same libtorch (the C++ examples):
#   bash scripts/cmake_build.sh --source examples/aoti_cpp BUILD_DIR -DFUSED_POOLFORMER_OPS_LIBRARY=...
# Finds the CUDA toolkit root and torch's libnvrtc, which find_package(Torch) needs for a
# CUDA build of torch even when the library itself is CPU-only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="$ROOT"
if [ "${1:-}" = --source ]; then SOURCE="${2:?--source needs a directory}"; shift 2; fi
BUILD="${1:?usage: cmake_build.sh [--source DIR] BUILD_DIR [cmake args]}"; shift
PY="${PYTHON:-python}"
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX")
CUDA_ROOT="${CUDA_HOME:-}"
if [ -z "$CUDA_ROOT" ] && command -v nvcc >/dev/null; then
  # the toolkit root nvcc reports (the parent of the nvcc on PATH may be a wrapper's folder)
  CUDA_ROOT="$(nvcc -dryrun x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
  [ -n "$CUDA_ROOT" ] && CUDA_ROOT="$(realpath "$CUDA_ROOT")"
fi
if [ -n "$CUDA_ROOT" ]; then ARGS+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"); fi
NVRTC="$("$PY" - <<'PYEOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvrtc.so*"), recursive=True))
print(hits[0] if hits else "")
PYEOF
)"
if [ -n "$NVRTC" ]; then ARGS+=(-DCUDA_nvrtc_LIBRARY="$NVRTC"); fi
cmake -S "$SOURCE" -B "$BUILD" "${ARGS[@]}" "$@"
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
