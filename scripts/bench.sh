#!/usr/bin/env bash
# The main job: sets up the environment, builds, runs the benchmark.
# Extra arguments go to the benchmark (e.g. `bash scripts/bench.sh --quick --json out.json`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m fused_poolformer.bench "$@"
