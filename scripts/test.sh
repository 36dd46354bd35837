#!/usr/bin/env bash
# The test command: sets up the environment, builds, runs the whole pytest suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k cpu -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -ra "$@"
